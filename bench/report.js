#!/usr/bin/env node
// Assembles the results of bench/run.sh (a work directory of per-run JSON files) into one table
// on stdout and one JSON file:   node bench/report.js WORK_DIR OUT_JSON
// Settings and a few facts come from BENCH_* environment variables set by run.sh.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { execFileSync } = require('child_process');
const { num, median, ratio, round } = require('./stats');

const [work, out] = process.argv.slice(2);
if (!work || !out) {
  console.error('usage: node bench/report.js WORK_DIR OUT_JSON');
  process.exit(2);
}
const env = process.env;

// Project targets (see bench/README.md).
const TARGET = {
  unaryVsNodemailer: 2.0, // unary delivered rate >= 2 x Nodemailer
  unaryVsSmtpSource: 0.4, // unary delivered rate >= 40% of smtp-source
  batchVsSmtpSource: 0.6, // SendBatch delivered rate >= 60% of smtp-source
  p99Ms: 10, // SendEmail p99 at 1000 req/s on PostgreSQL
  rssMib: 100, // peak RSS of the server
};

const readJson = (p) => JSON.parse(fs.readFileSync(p, 'utf8'));
const tryRun = (cmd, args) => {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 10000 }).trim();
  } catch {
    return null;
  }
};
// A reference that moved more than this between its runs before and after the passes
// marks the run as unfit for comparison.
const DRIFT_WARNING = 0.1;

// ---- references
function loadRuns(prefix) {
  const dir = path.join(work, 'refs');
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((f) => f.startsWith(prefix + '-') && /-\d+\.json$/.test(f) && !f.endsWith('.extra.json'))
    .sort((a, b) => parseInt(a.slice(prefix.length + 1)) - parseInt(b.slice(prefix.length + 1)))
    .map((f) => {
      const r = readJson(path.join(dir, f));
      const extra = path.join(dir, f.replace(/\.json$/, '.extra.json'));
      return fs.existsSync(extra) ? { ...r, ...readJson(extra) } : r;
    });
}
// The closing run of a reference (REF_CLOSE=1: after the mailgate passes), or null.
function loadClose(prefix) {
  const f = path.join(work, 'refs', `${prefix}-close.json`);
  if (!fs.existsSync(f)) return null;
  const extra = path.join(work, 'refs', `${prefix}-close.extra.json`);
  return { ...readJson(f), ...(fs.existsSync(extra) ? readJson(extra) : {}), closing: true };
}
const smtpOpening = loadRuns('smtp-source');
const nmOpening = loadRuns('nodemailer');
const smtpClose = loadClose('smtp-source');
const nmClose = loadClose('nodemailer');
// Every run counts for the reference's rate, the closing one too; how far the closing run
// moved from the opening runs' median is the drift (null without a closing run).
const smtpRuns = smtpClose ? [...smtpOpening, smtpClose] : smtpOpening;
const nmRuns = nmClose ? [...nmOpening, nmClose] : nmOpening;
const drift = (opening, close) => {
  const m = median(opening.map((r) => r.rate));
  return close && m ? close.rate / m - 1 : null;
};
const smtpDrift = drift(smtpOpening, smtpClose);
const nmDrift = drift(nmOpening, nmClose);
const pickMedianRun = (runs) => {
  const m = median(runs.map((r) => r.rate));
  if (m === null) return null;
  // the run closest to the median stands for the reference in the table
  return runs.reduce((best, r) => (Math.abs(r.rate - m) < Math.abs(best.rate - m) ? r : best), runs[0]);
};
// The table's other columns (CPU, RSS, steal) come from one opening run, the one closest to
// the opening runs' median: with a closing run the rate is the median of runs on both sides
// of the passes, which no single run stands for.
const smtp = pickMedianRun(smtpOpening);
const nm = pickMedianRun(nmOpening);
const smtpRate = median(smtpRuns.map((r) => r.rate));
const nmRate = median(nmRuns.map((r) => r.rate));

// ---- mailgate passes
const passesDir = path.join(work, 'passes');
const passes = fs.existsSync(passesDir)
  ? fs
      .readdirSync(passesDir)
      .filter((d) => fs.existsSync(path.join(passesDir, d, 'meta.json')))
      .map((d) => readJson(path.join(passesDir, d, 'meta.json')))
  : [];
const order = (p) =>
  (env.BENCH_PASSES || '').split(/\s+/).indexOf(p.database) * 10000 +
  (p.rate ? 2 : p.mode === 'batch' ? 1 : 0) * 1000 +
  (p.run || 1);
passes.sort((a, b) => order(a) - order(b));
// A pass counts only if the load generator succeeded and the server and the sink lived to the end.
const passOk = (p) => p.loadgen_exit === 0 && !!p.loadgen && p.server_alive_at_end !== false && p.sink_alive_at_end !== false;
// With REPEAT > 1 a pass ran several times: the run with the median delivered rate stands for
// it in the ratios and the targets (of an even number of runs, the slower of the middle two).
// A failed run counts as the slowest, so that failures cannot make a pass look faster.
const findPass = (db, mode, rated) => {
  const runs = passes.filter((p) => p.database === db && p.mode === mode && !!p.rate === rated);
  if (!runs.length) return undefined;
  const rate = (p) => (passOk(p) ? num(p.loadgen.delivered_rate) ?? -1 : -1);
  const sorted = [...runs].sort((a, b) => rate(a) - rate(b));
  const chosen = sorted[Math.floor((sorted.length - 1) / 2)];
  return passOk(chosen) ? chosen : undefined;
};
const repeated = passes.some((p) => (p.run || 1) > 1);
const medianPasses = new Set();
for (const p of passes) {
  const m = findPass(p.database, p.mode, !!p.rate);
  if (m) medianPasses.add(m);
}
for (const p of passes) p.median_run = repeated ? medianPasses.has(p) : undefined;

// ---- ratios and targets
const ratios = {};
const targets = [];
const dbs = [...new Set(passes.map((p) => p.database))];
for (const db of dbs) {
  const unary = findPass(db, 'unary', false);
  const batch = findPass(db, 'batch', false);
  const u = unary && unary.loadgen ? unary.loadgen.delivered_rate : null;
  const b = batch && batch.loadgen ? batch.loadgen.delivered_rate : null;
  ratios[db] = {
    unary_vs_smtp_source: round(ratio(u, smtpRate), 3),
    unary_vs_nodemailer: round(ratio(u, nmRate), 3),
    batch_vs_smtp_source: round(ratio(b, smtpRate), 3),
    batch_vs_nodemailer: round(ratio(b, nmRate), 3),
  };
  targets.push(
    { name: 'unary delivered >= 2x Nodemailer', database: db, value: ratios[db].unary_vs_nodemailer, unit: 'x', target: TARGET.unaryVsNodemailer },
    { name: 'unary delivered >= 40% of smtp-source', database: db, value: ratios[db].unary_vs_smtp_source, unit: '%', target: TARGET.unaryVsSmtpSource },
    { name: 'SendBatch delivered >= 60% of smtp-source', database: db, value: ratios[db].batch_vs_smtp_source, unit: '%', target: TARGET.batchVsSmtpSource },
  );
}
for (const p of passes.filter((p) => p.rate)) {
  const lat = passOk(p) && p.loadgen.latency_ms ? p.loadgen.latency_ms : {};
  targets.push({
    name: `SendEmail p99 <= ${TARGET.p99Ms} ms at ${p.rate} req/s` + (p.database === 'postgres' ? '' : ' (target is for PostgreSQL)'),
    database: p.database,
    value: num(lat.p99),
    unit: 'ms',
    target: TARGET.p99Ms,
    lower_is_better: true,
    informational: p.database !== 'postgres' || p.rate !== 1000,
  });
}
if (passes.length) {
  const rss = passes.map((p) => num(p.server && p.server.peak_rss_mib)).filter((x) => x !== null);
  targets.push({ name: `peak RSS <= ${TARGET.rssMib} MiB (largest of all passes)`, database: 'all', value: rss.length ? Math.max(...rss) : null, unit: 'MiB', target: TARGET.rssMib, lower_is_better: true });
}
for (const t of targets) {
  t.pass = t.value === null ? null : t.lower_is_better ? t.value <= t.target : t.value >= t.target;
}

// ---- machine
const readText = (p) => {
  try {
    return fs.readFileSync(p, 'utf8');
  } catch {
    return '';
  }
};
const cpuModel = (readText('/proc/cpuinfo').match(/^model name\s*:\s*(.*)$/m) || [])[1] || (os.cpus()[0] || {}).model || 'unknown';
const memKb = Number((readText('/proc/meminfo').match(/^MemTotal:\s*(\d+)/m) || [])[1] || 0);
const osName = (readText('/etc/os-release').match(/^PRETTY_NAME="?([^"\n]*)"?/m) || [])[1] || os.type();
const gitCommit = tryRun('git', ['-C', path.join(__dirname, '..'), 'rev-parse', 'HEAD']);
const gitDirty = tryRun('git', ['-C', path.join(__dirname, '..'), 'status', '--porcelain', '--untracked-files=no']);
let pgVersion = null;
if (passes.some((p) => p.database === 'postgres') && env.BENCH_PG_URL) {
  pgVersion = tryRun('psql', [env.BENCH_PG_URL + '/postgres', '-qAt', '-c', 'show server_version']);
}
const machine = {
  nproc: Number(env.BENCH_NPROC) || os.cpus().length,
  cpu_model: cpuModel,
  memory_mib: Math.round(memKb / 1024),
  kernel: tryRun('uname', ['-srvm']) || os.release(),
  os: osName,
  date: new Date().toISOString(),
  git_commit: gitCommit,
  git_dirty: gitDirty === null ? null : gitDirty.length > 0,
  loadavg_start: env.BENCH_LOADAVG_START || null,
  loadavg_end: env.BENCH_LOADAVG_END || null,
  versions: {
    node: process.version,
    nodemailer: nm ? nm.version : null,
    postfix: env.BENCH_POSTFIX_VERSION || null,
    rustc: passes.length ? tryRun('rustc', ['--version']) : null,
    mailgate: passes.length && env.BENCH_MAILGATE_BIN ? tryRun(env.BENCH_MAILGATE_BIN, ['--version']) : null,
    postgres: pgVersion,
  },
};

// ---- the table
const f = (x, d = 0) => (num(x) === null ? '-' : x.toFixed(d));
const fx = (x) => (num(x) === null ? '-' : x.toFixed(2) + 'x');
const sr = (x) => (num(x) === null ? '-' : String(x));
const fp = (x) => (num(x) === null ? '-' : (x * 100).toFixed(0) + '%');
const cols = [
  ['run', 38, 'l'],
  ['delivered/s', 11],
  ['vs smtp-src', 10],
  ['vs nodemlr', 10],
  ['accepted/s', 10],
  ['p50 ms', 7],
  ['p99 ms', 7],
  ['p99.9 ms', 8],
  ['max ms', 7],
  ['RSS MiB', 7],
  ['CPU s', 6],
  ['CPU us/msg', 10],
  ['DB us/msg', 9],
  ['errors', 6],
  ['sink got', 8],
  ['steal', 5],
];
const line = (cells) =>
  cells.map((c, i) => (cols[i][2] === 'l' ? String(c).padEnd(cols[i][1]) : String(c).padStart(cols[i][1]))).join(' ');
const rows = [];
if (smtp) {
  const cpu = smtp.cpu_user_seconds + smtp.cpu_system_seconds;
  rows.push([`smtp-source -d, ${smtp.sessions} sessions`, f(smtpRate), fp(1), fx(ratio(smtpRate, nmRate)), '-', '-', '-', '-', '-', '-', f(cpu, 2), f((cpu / smtp.messages) * 1e6), '-', '-', sr(smtp.sink_received), fp(smtp.steal_share)]);
}
if (nm) {
  const cpu = nm.cpu_user_seconds + nm.cpu_system_seconds;
  rows.push([`nodemailer ${nm.version} pool ${nm.connections}`, f(nmRate), fp(ratio(nmRate, smtpRate)), fx(1), '-', '-', '-', '-', '-', f(nm.peak_rss_mib, 1), f(cpu, 2), f((cpu / nm.messages) * 1e6), '-', nm.errors, sr(nm.sink_received), fp(nm.steal_share)]);
}
for (const p of passes) {
  const l = p.loadgen || {};
  const lat = l.latency_ms || {};
  const label =
    `mailgate ${p.database} ` +
    (p.rate ? `unary @${p.rate}/s` : p.mode === 'batch' ? 'SendBatch' : `unary C=${p.concurrency}`) +
    (repeated && !p.rate ? ` #${p.run || 1}${medianPasses.has(p) ? '*' : ''}` : '');
  const failed = !passOk(p);
  const cpu = p.server ? p.server.cpu_seconds : null;
  const dbCpu = num(p.database_cpu_seconds);
  rows.push([
    label + (failed ? ' FAILED' : ''),
    f(l.delivered_rate),
    p.rate ? '-' : fp(ratio(l.delivered_rate, smtpRate)),
    p.rate ? '-' : fx(ratio(l.delivered_rate, nmRate)),
    f(l.accept_rate),
    f(lat.p50, 2),
    f(lat.p99, 2),
    f(lat.p999, 2),
    f(lat.max, 1),
    f(p.server && p.server.peak_rss_mib, 1),
    f(cpu, 2),
    f(num(cpu) !== null ? (cpu / p.messages) * 1e6 : null),
    f(dbCpu !== null ? (dbCpu / p.messages) * 1e6 : null),
    l.errors === undefined ? '-' : l.errors,
    sr(p.sink_received),
    fp(p.steal_share),
  ]);
}
const tableLines = [];
const settings = {
  messages: Number(env.BENCH_N),
  concurrency: Number(env.BENCH_C),
  size: Number(env.BENCH_SIZE),
  passes: (env.BENCH_PASSES || '').split(/\s+/).filter(Boolean),
  rate: Number(env.BENCH_RATE),
  rate_messages: Number(env.BENCH_RATE_N),
  rate_on: (env.BENCH_RATE_ON || '').split(/\s+/).filter(Boolean),
  references_only: env.BENCH_REFERENCES_ONLY === '1',
  repeat: Number(env.BENCH_REPEAT) || 1,
  reference_runs: smtpOpening.length,
  reference_closing_run: Boolean(smtpClose || nmClose),
  mailgate_log_level: env.BENCH_LOG_LEVEL || null,
  sink_count: env.BENCH_SINK_COUNT === '1',
  // Microseconds added to every fsync/fdatasync of the mailgate server (a slower disk,
  // bench/slow_sync.c): 0 = the machine's own disk.
  sync_delay_us: Number(env.BENCH_SYNC_DELAY_US) || 0,
  // The server's worker threads when set (MAILGATE_WORKER_THREADS wins over Tokio's
  // TOKIO_WORKER_THREADS, as in mailgate): null = one per CPU, the default.
  server_worker_threads:
    Number(env.MAILGATE_WORKER_THREADS || env.TOKIO_WORKER_THREADS) || null,
};
tableLines.push(
  `mailgate benchmark ${machine.date}  N=${settings.messages} C=${settings.concurrency} SIZE=${settings.size}  ` +
    `${machine.nproc} CPUs (${cpuModel}), ${(machine.memory_mib / 1024).toFixed(1)} GiB, load avg at start ${machine.loadavg_start}` +
    (settings.server_worker_threads ? `  server worker threads ${settings.server_worker_threads}` : '') +
    (settings.sync_delay_us ? `  server syncs +${settings.sync_delay_us} us (SYNC_DELAY_US)` : ''),
);
tableLines.push(line(cols.map((c) => c[0])));
tableLines.push(line(cols.map((c) => '-'.repeat(c[1]))));
for (const r of rows) tableLines.push(line(r));
tableLines.push('CPU: the client for the references (user+sys), the mailgate server during the load for the passes; the loadgen and the sink also use the same cores.');
tableLines.push("DB: the PostgreSQL server's processes on this machine during a postgres pass (SQLite's work is in mailgate's CPU).");
tableLines.push("steal: the share of the machine's CPU time its VM host took during the run (/proc/stat); a run with more steal is slower for a reason outside it.");
if (repeated) {
  tableLines.push('#n: the run of a pass (REPEAT); * marks the run with the median delivered rate, which the targets use.');
}
if (smtpDrift !== null || nmDrift !== null) {
  const pct = (d) => (d === null ? 'n/a' : `${d >= 0 ? '+' : ''}${(d * 100).toFixed(1)}%`);
  const moved = Math.max(Math.abs(smtpDrift || 0), Math.abs(nmDrift || 0));
  tableLines.push(
    `references: the rates above are the median of each reference's runs before and after the passes (the other columns: a run before); ` +
      `after the passes smtp-source ran ${pct(smtpDrift)} and Nodemailer ${pct(nmDrift)} against before` +
      (moved > DRIFT_WARNING ? ` - WARNING: the machine's speed changed during the run; compare its ratios with care` : ''),
  );
}
if (targets.length) {
  tableLines.push('');
  tableLines.push('targets');
  for (const t of targets) {
    const v =
      t.value === null ? 'n/a'
      : t.unit === 'x' ? t.value.toFixed(2) + 'x'
      : t.unit === '%' ? (t.value * 100).toFixed(1) + '%'
      : t.value.toFixed(t.unit === 'ms' ? 2 : 1) + ' ' + t.unit;
    const verdict = t.pass === null ? 'NO DATA' : t.pass ? 'PASS' : 'MISS';
    tableLines.push(`  ${(t.name + (t.database === 'all' ? '' : ` [${t.database}]`)).padEnd(60)} ${v.padStart(10)}  ${verdict}${t.informational ? ' (informational)' : ''}`);
  }
}
const table = tableLines.join('\n');
console.log(table);

const result = {
  schema: 'mailgate-bench/1',
  settings,
  machine,
  references: {
    smtp_source: { rate: smtpRate, drift: round(smtpDrift, 4), runs: smtpRuns },
    nodemailer: { rate: nmRate, drift: round(nmDrift, 4), runs: nmRuns },
  },
  passes,
  ratios,
  targets,
  table,
};
fs.mkdirSync(path.dirname(path.resolve(out)), { recursive: true });
fs.writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
