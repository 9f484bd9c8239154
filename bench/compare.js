#!/usr/bin/env node
// Pools the runs of bench/compare.sh and compares the two servers, pass by pass.
//   node bench/compare.js OUT_JSON BEFORE_LABEL AFTER_LABEL LABEL=ROUND=FILE...
// Each FILE is a bench/run.sh result. For every burst pass (database and mode) it takes the
// delivered rate of every run of each side, and for the fixed-rate pass its p99 latency; it
// prints a table and writes the same figures as JSON.
'use strict';

const fs = require('fs');
const path = require('path');
const { num, median, mean, ratio, round } = require('./stats');

const [out, beforeLabel, afterLabel, ...entries] = process.argv.slice(2);
if (!out || !beforeLabel || !afterLabel || !entries.length) {
  console.error('usage: node bench/compare.js OUT_JSON BEFORE_LABEL AFTER_LABEL LABEL=ROUND=FILE...');
  process.exit(2);
}

const pct = (r) => (num(r) === null ? '-' : `${r >= 1 ? '+' : ''}${((r - 1) * 100).toFixed(1)} %`);

// runs[label][round] = [{ key, value, serverUs, dbUs }] and the references of each file.
const runs = {};
const references = {};
for (const entry of entries) {
  const [label, roundNo, ...rest] = entry.split('=');
  const file = rest.join('=');
  const result = JSON.parse(fs.readFileSync(file, 'utf8'));
  const mine = ((runs[label] ||= {})[roundNo] ||= []);
  for (const p of result.passes || []) {
    const lg = p.loadgen || {};
    const messages = num(p.messages) || num(lg.messages);
    const perEmail = (seconds) => (num(seconds) !== null && messages ? (seconds * 1e6) / messages : null);
    const fixed = p.rate !== null && p.rate !== undefined;
    mine.push({
      key: `${p.database} ${fixed ? `SendEmail @${p.rate}/s p99 ms` : p.mode === 'batch' ? 'SendBatch msg/s' : 'SendEmail msg/s'}`,
      higherIsBetter: !fixed,
      value: fixed ? num(lg.latency_ms && lg.latency_ms.p99) : num(lg.delivered_rate),
      serverUs: perEmail(p.server && p.server.cpu_seconds),
      dbUs: perEmail(p.database_cpu_seconds),
    });
  }
  const refs = result.references || {};
  (references[label] ||= []).push({
    file: path.basename(file),
    smtp_source: num(refs.smtp_source && refs.smtp_source.rate),
    nodemailer: num(refs.nodemailer && refs.nodemailer.rate),
  });
}

const labels = [beforeLabel, afterLabel];
const keys = [...new Set(Object.values(runs).flatMap((r) => Object.values(r).flat().map((x) => x.key)))];
const rounds = [...new Set(Object.values(runs).flatMap((r) => Object.keys(r)))].sort((a, b) => a - b);
const of = (label, key, roundNo) =>
  Object.entries(runs[label] || {})
    .filter(([r]) => roundNo === undefined || r === roundNo)
    .flatMap(([, xs]) => xs.filter((x) => x.key === key));

const passes = keys.map((key) => {
  const sides = Object.fromEntries(
    labels.map((label) => {
      const xs = of(label, key);
      const values = xs.map((x) => x.value);
      return [
        label,
        {
          values: values.map((v) => round(v, 2)),
          median: round(median(values), 2),
          mean: round(mean(values), 2),
          min: round(Math.min(...values.filter((v) => num(v) !== null)), 2),
          max: round(Math.max(...values.filter((v) => num(v) !== null)), 2),
          server_cpu_us_per_email: round(median(xs.map((x) => x.serverUs)), 1),
          database_cpu_us_per_email: round(median(xs.map((x) => x.dbUs)), 1),
        },
      ];
    }),
  );
  const byRound = rounds.map((r) =>
    round(ratio(median(of(afterLabel, key, r).map((x) => x.value)), median(of(beforeLabel, key, r).map((x) => x.value))), 4),
  );
  const higherIsBetter = of(beforeLabel, key).concat(of(afterLabel, key)).every((x) => x.higherIsBetter);
  return {
    pass: key,
    higher_is_better: higherIsBetter,
    ...sides,
    after_over_before: round(ratio(sides[afterLabel].median, sides[beforeLabel].median), 4),
    after_over_before_by_round: byRound,
  };
});

const lines = [];
lines.push(`mailgate comparison: ${afterLabel} against ${beforeLabel}, ${rounds.length} round(s), runs pooled`);
const pad = (s, n) => String(s).padEnd(n);
const lpad = (s, n) => String(s).padStart(n);
lines.push(
  `${pad('pass', 34)}${lpad(beforeLabel + ' median', 17)}${lpad('range', 19)}${lpad(afterLabel + ' median', 17)}${lpad('range', 19)}${lpad('change', 10)}  by round`,
);
for (const p of passes) {
  const b = p[beforeLabel];
  const a = p[afterLabel];
  lines.push(
    `${pad(p.pass, 34)}${lpad(b.median ?? '-', 17)}${lpad(`${b.min}-${b.max}`, 19)}${lpad(a.median ?? '-', 17)}${lpad(`${a.min}-${a.max}`, 19)}${lpad(pct(p.after_over_before), 10)}  ${p.after_over_before_by_round.map(pct).join(', ')}`,
  );
}
lines.push('');
lines.push('CPU per email at the median (us): server / database');
for (const p of passes.filter((x) => x.higher_is_better)) {
  const b = p[beforeLabel];
  const a = p[afterLabel];
  lines.push(
    `${pad(p.pass, 34)}${beforeLabel} ${b.server_cpu_us_per_email ?? '-'} / ${b.database_cpu_us_per_email ?? '-'}, ${afterLabel} ${a.server_cpu_us_per_email ?? '-'} / ${a.database_cpu_us_per_email ?? '-'}`,
  );
}
lines.push('');
lines.push('references of each run (msg/s): smtp-source / Nodemailer');
for (const label of labels) {
  const refs = references[label] || [];
  lines.push(`${pad(label, 12)}${refs.map((r) => `${Math.round(r.smtp_source)} / ${Math.round(r.nodemailer)}`).join(', ')}`);
}
lines.push('change: the after/before ratio of the pooled medians; by round: the same within each round');
console.log(lines.join('\n'));

fs.mkdirSync(path.dirname(out), { recursive: true });
fs.writeFileSync(
  out,
  JSON.stringify(
    {
      schema: 'mailgate-bench-compare/1',
      before: beforeLabel,
      after: afterLabel,
      rounds: rounds.length,
      runs: entries.map((e) => {
        const [label, roundNo, ...rest] = e.split('=');
        return { label, round: Number(roundNo), file: path.basename(rest.join('=')) };
      }),
      references,
      passes,
    },
    null,
    2,
  ) + '\n',
);
console.log(`written to ${out}`);
