// Message rates from counters: the broker reports counters since it started; the dashboard polls them and divides
// the change by the time between two polls. Invariant: a rate is never negative (a counter that went down means
// the broker restarted, and that interval gives no rate) and never made up before two samples exist.

export const RATE_NAMES = ['published', 'delivered', 'acked'];

export class RateMeter {
  constructor(names = RATE_NAMES) {
    this.names = names;
    this.previous = null;
    this.rates = Object.fromEntries(names.map((n) => [n, null]));
  }

  /** Record counters seen at `t` (seconds); returns a new {name: per-second rate or null}. */
  sample(t, counters) {
    const previous = this.previous;
    this.previous = {t, counters};
    if (previous && t > previous.t) {
      const dt = t - previous.t;
      for (const n of this.names) {
        const delta = (counters[n] ?? 0) - (previous.counters[n] ?? 0);
        this.rates[n] = delta >= 0 ? delta / dt : null;
      }
    }
    return {...this.rates};
  }
}

/** Rates of many things (queues), keyed by name; forgets names no longer present. */
export class RateBook {
  constructor() {
    this.meters = new Map();
  }

  sample(t, items, key, counters) {
    const seen = new Set();
    const out = new Map();
    for (const item of items) {
      const k = key(item);
      seen.add(k);
      if (!this.meters.has(k)) this.meters.set(k, new RateMeter());
      out.set(k, this.meters.get(k).sample(t, counters(item)));
    }
    for (const k of [...this.meters.keys()]) if (!seen.has(k)) this.meters.delete(k);
    return out;
  }
}

/** Seconds from a monotonic clock (independent of wall-clock changes). */
export const now = () => performance.now() / 1000;
