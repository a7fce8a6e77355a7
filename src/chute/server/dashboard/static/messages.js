// Showing messages: a table of peeked messages (headers, body, delivery count) and the publish form shared by the
// queue and topic pages. Bodies and headers are user data: they are only ever put in the page as text.

import {field, h, LiveTable} from './dom.js';
import * as fmt from './format.js';
import {actionForm, numberOrNull, parseHeaders} from './ui.js';

const BODY_PREVIEW_CHARS = 2000;

function headersCell(headers) {
  const entries = Object.entries(headers || {});
  if (entries.length === 0) return h('span', {class: 'hint'}, 'none');
  return h('dl', {class: 'headers'}, entries.map(([k, v]) => h('div', {}, h('dt', {}, `${k}:`), ' ', h('dd', {}, v))));
}

function bodyCell(message) {
  const body = message.body.length > BODY_PREVIEW_CHARS
    ? `${message.body.slice(0, BODY_PREVIEW_CHARS)}… (${fmt.count(message.body.length)} characters)` : message.body;
  return h('div', {},
    message.body_encoding === 'base64' ? h('span', {class: 'hint'}, 'binary, shown as base64') : null,
    h('pre', {}, body));
}

export function messageTable() {
  return new LiveTable({
    caption: 'Messages (in delivery order)',
    key: (d) => d.message.id,
    empty: 'No messages.',
    columns: [
      {label: 'ID', cell: (d) => h('code', {}, d.message.id)},
      {label: 'Published', text: (d) => fmt.time(d.message.publish_time)},
      {label: 'Deliveries', numeric: true, text: (d) => fmt.count(d.delivery_count)},
      {label: 'Priority', numeric: true, text: (d) => String(d.message.priority ?? 0)},
      {label: 'Headers', cell: (d) => headersCell(d.message.headers)},
      {label: 'Body', cell: (d) => bodyCell(d.message)},
      {label: 'Details', text: (d) => [
        d.message.subject ? `subject ${d.message.subject}` : '',
        d.message.group ? `group ${d.message.group}` : '',
        d.dead_letter_reason ? `dead-lettered (${d.dead_letter_reason.replace('_', ' ')})` +
          (d.dead_letter_source ? ` from ${d.dead_letter_source}` : '') : '',
      ].filter(Boolean).join('; ') || '–'},
    ],
  });
}

/** A form that publishes one message to `path` (…/messages); `withSubject` for topics. */
export function publishForm(ctx, path, {withSubject = false, onPublished} = {}) {
  const body = h('textarea', {name: 'body', rows: 3});
  const headers = h('textarea', {name: 'headers', rows: 2, placeholder: 'content-type: application/json'});
  const subject = withSubject ? h('input', {name: 'subject', autocomplete: 'off'}) : null;
  const priority = h('input', {name: 'priority', type: 'number', min: 0, max: 9, step: 1, value: '0'});
  const delay = h('input', {name: 'delay_s', type: 'number', min: 0, step: 'any'});
  const group = h('input', {name: 'group', autocomplete: 'off'});
  const form = h('form', {'aria-label': 'Publish a message'},
    h('div', {class: 'fields'},
      subject ? field('Subject', subject, 'Default: the topic name') : null,
      h('div', {class: 'field wide'}, field('Body', body)),
      h('div', {class: 'field wide'}, field('Headers', headers, 'One "name: value" per line')),
      field('Priority (0-9)', priority),
      field('Delay (s)', delay, 'Default: the queue’s'),
      field('Group', group, 'FIFO group key, optional')),
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Publish')));
  actionForm(form, async () => {
    const message = {body: body.value};
    const parsed = parseHeaders(headers.value);
    if (parsed) message.headers = parsed;
    const p = numberOrNull(priority);
    if (p !== null) message.priority = p;
    const d = numberOrNull(delay);
    if (d !== null) message.delay_s = d;
    if (group.value.trim()) message.group = group.value.trim();
    if (subject && subject.value.trim()) message.subject = subject.value.trim();
    const reply = await ctx.api('POST', path, message);
    if (onPublished) onPublished();
    return `Published message ${reply.id}.`;
  });
  return form;
}
