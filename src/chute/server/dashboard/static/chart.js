// A small line chart of message rates (inline SVG, no library). Lines differ by dash pattern as well as colour,
// and the chart's text alternative states the latest figures, so nothing depends on seeing colours.

import {h, svg} from './dom.js';
import * as fmt from './format.js';

const WIDTH = 600;
const HEIGHT = 160;
const LABELS = {published: 'publish', delivered: 'deliver', acked: 'ack'};

export class RateChart {
  constructor(series, capacity = 40) {
    this.series = series;
    this.capacity = capacity;
    this.points = [];
    this.lines = Object.fromEntries(series.map((s) => [s, svg('polyline', {class: `series series-${s}`, points: ''})]));
    this.maxLabel = svg('text', {class: 'axis-label', x: 4, y: 12}, '');
    this.svg = svg('svg', {class: 'chart', viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: 'none',
      role: 'img', 'aria-label': 'Message rates: no data yet'},
    svg('line', {class: 'grid-line', x1: 0, y1: HEIGHT - 1, x2: WIDTH, y2: HEIGHT - 1}),
    svg('line', {class: 'grid-line', x1: 0, y1: HEIGHT / 2, x2: WIDTH, y2: HEIGHT / 2}),
    Object.values(this.lines), this.maxLabel);
    this.el = h('figure', {class: 'chart-figure'}, this.svg,
      h('figcaption', {}, h('ul', {class: 'legend'}, series.map((s) => h('li', {},
        svg('svg', {width: 28, height: 8, 'aria-hidden': 'true'},
          svg('line', {class: `series series-${s}`, x1: 0, y1: 4, x2: 28, y2: 4})),
        `${LABELS[s] || s} per second`))),
      h('span', {class: 'hint'}, 'The last minute.')));
  }

  push(rates) {
    this.points.push(rates);
    if (this.points.length > this.capacity) this.points.shift();
    let max = 1;
    for (const p of this.points) for (const s of this.series) max = Math.max(max, p[s] ?? 0);
    const step = WIDTH / (this.capacity - 1);
    const offset = this.capacity - this.points.length;
    for (const s of this.series) {
      const coords = this.points.map((p, i) =>
        `${((offset + i) * step).toFixed(1)},${(HEIGHT - 2 - ((p[s] ?? 0) / max) * (HEIGHT - 18)).toFixed(1)}`);
      this.lines[s].setAttribute('points', coords.join(' '));
    }
    this.maxLabel.textContent = `${fmt.rate(max)} /s`;
    const latest = this.series.map((s) => `${LABELS[s] || s} ${fmt.rate(rates[s])} per second`).join(', ');
    this.svg.setAttribute('aria-label', `Message rates now: ${latest}`);
  }
}
