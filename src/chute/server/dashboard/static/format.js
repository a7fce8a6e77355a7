// Numbers, sizes, durations and times as people read them. Pure functions of their arguments.

const integer = new Intl.NumberFormat('en', {maximumFractionDigits: 0});
const oneDecimal = new Intl.NumberFormat('en', {minimumFractionDigits: 1, maximumFractionDigits: 1});

export function count(n) {
  return typeof n === 'number' && Number.isFinite(n) ? integer.format(n) : '–';
}

/** "1 message", "2 messages". */
export function plural(n, noun) {
  return `${count(n)} ${n === 1 ? noun : `${noun}s`}`;
}

/** A rate in messages per second; null (not measured yet) is a dash. */
export function rate(r) {
  if (r === null || r === undefined || !Number.isFinite(r)) return '–';
  return r >= 100 ? integer.format(r) : oneDecimal.format(r);
}

export function bytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${oneDecimal.format(value)} ${units[unit]}`;
}

/** A duration in seconds: "45 s", "12 min 3 s", "5 h 2 min", "3 d 4 h". */
export function duration(s) {
  if (typeof s !== 'number' || !Number.isFinite(s)) return '–';
  if (s < 10) return `${oneDecimal.format(s)} s`;
  const t = Math.round(s);
  if (t < 60) return `${t} s`;
  const two = (big, bigUnit, small, smallUnit) =>
    (small ? `${big} ${bigUnit} ${small} ${smallUnit}` : `${big} ${bigUnit}`);
  if (t < 3600) return two(Math.floor(t / 60), 'min', t % 60, 's');
  if (t < 86400) return two(Math.floor(t / 3600), 'h', Math.floor((t % 3600) / 60), 'min');
  return two(Math.floor(t / 86400), 'd', Math.floor((t % 86400) / 3600), 'h');
}

/** Unix seconds as a local date and time (ISO-like, sortable). */
export function time(unix) {
  if (typeof unix !== 'number' || !Number.isFinite(unix)) return '–';
  const d = new Date(unix * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A setting value: null means unlimited / off. */
export function setting(value, unit = '') {
  if (value === null || value === undefined) return 'off';
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  return unit ? `${value} ${unit}` : String(value);
}
