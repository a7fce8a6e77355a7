// Building the page: every value goes in through textContent or setAttribute, never as HTML.
// Invariant: no function here parses markup; data from the broker (queue names, headers, bodies) stays text.

const SVG_NS = 'http://www.w3.org/2000/svg';

function append(parent, child) {
  if (child === null || child === undefined || child === false) return;
  if (Array.isArray(child)) {
    for (const c of child) append(parent, c);
  } else if (child instanceof Node) {
    parent.appendChild(child);
  } else {
    parent.appendChild(document.createTextNode(String(child)));
  }
}

function setAttributes(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      el.setAttribute('class', value);
    } else if (name === 'value' && 'value' in el) {
      el.value = value;
    } else if (name === 'checked' || name === 'selected') {
      el[name] = Boolean(value);
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
}

/** An element: h('a', {href: '#/x'}, 'text', child, [more]). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttributes(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element (for charts). */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

/** Set a node's text only when it changed (so screen readers and selection are not disturbed). */
export function setText(node, text) {
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

let uniqueCounter = 0;
/** An id unique in this page, for label/for and aria-describedby pairs. */
export function uid(prefix) {
  uniqueCounter += 1;
  return `${prefix}-${uniqueCounter}`;
}

/** A labelled form field: the label's `for` names the control. */
export function field(label, control, hint) {
  const id = control.id || uid('f');
  control.id = id;
  const parts = [h('label', {for: id}, label), control];
  if (hint) {
    const hintId = uid('hint');
    control.setAttribute('aria-describedby', hintId);
    parts.push(h('span', {class: 'hint', id: hintId}, hint));
  }
  return h('div', {class: 'field'}, parts);
}

/**
 * A table whose rows are kept in place across refreshes, keyed by `key(item)`: text cells are updated, rows
 * added and removed, so a focused link or button in a row keeps its focus while data changes.
 * columns: [{label, text: item => string, numeric?}, or {label, cell: item => Node (made once per row)}].
 */
export class LiveTable {
  constructor({caption, columns, key, empty}) {
    this.columns = columns;
    this.key = key;
    this.rows = new Map();
    this.tbody = h('tbody');
    this.emptyRow = h('tr', {class: 'empty'}, h('td', {colspan: columns.length}, empty || 'None.'));
    this.el = h('div', {class: 'table-wrap'},
      h('table', {},
        caption ? h('caption', {}, caption) : null,
        h('thead', {}, h('tr', {},
          columns.map((c) => h('th', {scope: 'col', class: c.numeric ? 'num' : null}, c.label)))),
        this.tbody));
    this.update([]);
  }

  update(items) {
    const seen = new Set();
    let previous = null;
    for (const item of items) {
      const k = this.key(item);
      seen.add(k);
      let row = this.rows.get(k);
      if (!row) {
        row = h('tr', {'data-key': k}, this.columns.map((c) => h('td', {class: c.numeric ? 'num' : null},
          c.cell ? c.cell(item) : null)));
        this.rows.set(k, row);
      }
      this.columns.forEach((c, i) => { if (c.text) setText(row.children[i], c.text(item)); });
      const wanted = previous ? previous.nextSibling : this.tbody.firstChild;
      if (wanted !== row) this.tbody.insertBefore(row, wanted);
      previous = row;
    }
    for (const [k, row] of this.rows) {
      if (!seen.has(k)) { row.remove(); this.rows.delete(k); }
    }
    if (items.length === 0) this.tbody.appendChild(this.emptyRow);
    else this.emptyRow.remove();
  }
}
