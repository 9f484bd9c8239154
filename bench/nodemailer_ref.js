#!/usr/bin/env node
// Reference 2 of the mailgate benchmark: Nodemailer with a connection pool sends N messages of
// about SIZE bytes to an SMTP server (Postfix's smtp-sink in bench/run.sh) and reports msg/s.
//
//   NODE_PATH=<dir>/node_modules node bench/nodemailer_ref.js \
//     --host 127.0.0.1 --port 2525 --messages 20000 --connections 32 --size 1500 --json out.json
//
// Options: --inflight K (sendMail calls outstanding at once, default 8 x connections),
// --max-messages M (messages per pooled connection before it is replaced; Nodemailer's own
// default is 100, "inf" keeps each connection for the whole run).
// Every message is built by Nodemailer from fields (from, to, subject, text), as an application
// would; building MIME is part of what this reference measures.
'use strict';

const fs = require('fs');
const { performance } = require('perf_hooks');

function parseArgs(argv) {
  const opts = {
    host: '127.0.0.1',
    port: 25,
    messages: 20000,
    connections: 32,
    size: 1500,
    inflight: 0,
    maxMessages: 'inf',
    json: '',
  };
  const names = {
    '--host': 'host',
    '--port': 'port',
    '--messages': 'messages',
    '--connections': 'connections',
    '--size': 'size',
    '--inflight': 'inflight',
    '--max-messages': 'maxMessages',
    '--json': 'json',
  };
  for (let i = 0; i < argv.length; i++) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) {
      throw new Error(`unknown or incomplete option ${argv[i]} (known: ${Object.keys(names).join(' ')})`);
    }
    opts[key] = argv[++i];
  }
  for (const k of ['port', 'messages', 'connections', 'size', 'inflight']) {
    opts[k] = Number(opts[k]);
    if (!Number.isInteger(opts[k]) || opts[k] < 0) throw new Error(`--${k} must be a non-negative integer`);
  }
  if (opts.messages < 1 || opts.connections < 1) throw new Error('--messages and --connections must be >= 1');
  opts.maxMessages = opts.maxMessages === 'inf' ? Infinity : Number(opts.maxMessages);
  if (!(opts.maxMessages >= 1)) throw new Error('--max-messages must be >= 1 or "inf"');
  if (!opts.inflight) opts.inflight = opts.connections * 8;
  return opts;
}

function mailFor(i, bodyLength) {
  // Plain ASCII text in 76-character lines: Nodemailer keeps it 7bit, no re-encoding inflation.
  const line = 'x'.repeat(75) + '\n';
  let text = line.repeat(Math.floor(bodyLength / line.length));
  text += 'y'.repeat(Math.max(0, bodyLength - text.length));
  return {
    from: 'Bench Sender <bench@example.test>',
    to: `rcpt${i}@example.test`,
    subject: `mailgate benchmark message ${i}`,
    text,
  };
}

// Size of one message as Nodemailer builds it (headers + body, CRLF line ends).
async function builtSize(bodyLength, nodemailer) {
  const t = nodemailer.createTransport({ streamTransport: true, buffer: true, newline: 'windows' });
  const info = await t.sendMail(mailFor(0, bodyLength));
  return info.message.length;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  let nodemailer;
  try {
    nodemailer = require('nodemailer');
  } catch (e) {
    throw new Error('cannot load nodemailer (install it and set NODE_PATH to its node_modules): ' + e.message);
  }
  const version = require('nodemailer/package.json').version;

  // Pick the text length so that the whole built message is about --size bytes.
  let bodyLength = Math.max(0, opts.size - (await builtSize(0, nodemailer)));
  let messageBytes = await builtSize(bodyLength, nodemailer);
  for (let k = 0; k < 3 && messageBytes !== opts.size && bodyLength > 0; k++) {
    bodyLength = Math.max(0, bodyLength + opts.size - messageBytes);
    messageBytes = await builtSize(bodyLength, nodemailer);
  }

  const transporter = nodemailer.createTransport({
    host: opts.host,
    port: opts.port,
    secure: false,
    ignoreTLS: true,
    pool: true,
    maxConnections: opts.connections,
    maxMessages: opts.maxMessages,
    logger: false,
    debug: false,
    disableFileAccess: true,
    disableUrlAccess: true,
  });

  let next = 0;
  let done = 0;
  let errors = 0;
  let firstError = null;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await new Promise((resolve) => {
    const launch = () => {
      if (next >= opts.messages) return;
      const i = next++;
      transporter.sendMail(mailFor(i, bodyLength)).then(
        () => finish(),
        (err) => {
          errors++;
          if (!firstError) firstError = String(err && err.message ? err.message : err);
          finish();
        },
      );
    };
    const finish = () => {
      done++;
      if (done === opts.messages) resolve();
      else launch();
    };
    for (let k = 0; k < Math.min(opts.inflight, opts.messages); k++) launch();
  });
  const seconds = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  transporter.close();

  const result = {
    tool: 'nodemailer',
    version,
    node: process.version,
    messages: opts.messages,
    connections: opts.connections,
    max_messages_per_connection: opts.maxMessages === Infinity ? 'inf' : opts.maxMessages,
    inflight: opts.inflight,
    message_bytes: messageBytes,
    seconds: Number(seconds.toFixed(3)),
    rate: Number(((opts.messages - errors) / seconds).toFixed(1)),
    errors,
    first_error: firstError,
    cpu_user_seconds: Number((cpu.user / 1e6).toFixed(3)),
    cpu_system_seconds: Number((cpu.system / 1e6).toFixed(3)),
    peak_rss_mib: Number((process.resourceUsage().maxRSS / 1024).toFixed(1)),
  };
  const text = JSON.stringify(result, null, 2);
  if (opts.json) fs.writeFileSync(opts.json, text + '\n');
  console.log(text);
  if (errors > 0) process.exitCode = 1;
}

main().catch((e) => {
  console.error('nodemailer_ref: ' + (e && e.stack ? e.stack : e));
  process.exit(2);
});
