// Small figures shared by bench/report.js and bench/compare.js.
'use strict';

// A finite number, or null.
const num = (x) => (typeof x === 'number' && isFinite(x) ? x : null);
// The median of the finite numbers in xs, or null.
const median = (xs) => {
  const s = xs.filter((x) => num(x) !== null).sort((a, b) => a - b);
  if (!s.length) return null;
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
// The mean of the finite numbers in xs, or null.
const mean = (xs) => {
  const s = xs.filter((x) => num(x) !== null);
  return s.length ? s.reduce((a, b) => a + b, 0) / s.length : null;
};
// a / b, or null when either is missing or b is 0.
const ratio = (a, b) => (num(a) !== null && num(b) ? a / b : null);
// x to d decimals, or null.
const round = (x, d) => (num(x) === null ? null : Number(x.toFixed(d)));

module.exports = { num, median, mean, ratio, round };
