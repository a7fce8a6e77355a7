// The settings form of a queue page: every QueueSettings field the broker lets a PATCH change.
// Invariant: the form is filled from the broker once (and after a save, or when the user asks), never by a poll,
// so a poll never overwrites what the user is typing; a save sends only the fields that changed.

import {field, h} from './dom.js';
import {seg} from './api.js';
import {actionForm, numberOrNull} from './ui.js';

// [field, label, kind, hint, choices]; kind: number (empty = off), required number, text (empty = none), choice
// (a select of [value, text] choices).
const SETTINGS = [
  ['lease_s', 'Lease (s)', 'required', 'How long a delivery is leased'],
  ['max_deliveries', 'Max deliveries', 'number', 'Empty: unlimited'],
  ['dead_letter_queue', 'Dead-letter queue', 'text', 'Empty: dead letters are dropped'],
  ['delay_s', 'Delay (s)', 'required', 'Default delay of new messages'],
  ['retention_s', 'Retention (s)', 'number', 'Empty: kept until consumed'],
  ['on_expiry', 'When retention ends', 'choice', '',
    [['dead-letter', 'dead-letter the message'], ['drop', 'drop it (as SQS does)']]],
  ['max_length', 'Max length', 'number', 'Empty: unlimited'],
  ['max_bytes', 'Max bytes', 'number', 'Empty: unlimited'],
  ['overflow', 'When full', 'choice', '', [['reject', 'reject publishes'], ['reject-dead-letter', 'reject and dead-letter them'], ['drop-oldest', 'drop the oldest']]],
  ['rate_limit', 'Rate limit (/s)', 'number', 'Empty: no limit'],
  ['rate_burst', 'Rate burst', 'number', 'Empty: the default'],
  ['dedup_window_s', 'Dedup window (s)', 'required', ''],
];

export function settingsForm(ctx, name, onSaved) {
  const inputs = {};
  for (const [key, , kind, , choices] of SETTINGS) {
    inputs[key] = kind === 'choice'
      ? h('select', {name: key}, choices.map(([value, text]) => h('option', {value}, text)))
      : h('input', {name: key, autocomplete: 'off', ...(kind === 'text' ? {} : {type: 'number', step: 'any', min: 0}),
        ...(kind === 'required' ? {required: true} : {})});
  }
  let loaded = null;  // what the form was filled with (changes are computed against it)
  let latest = null;  // the broker's settings at the last poll (someone else may have changed them)
  const form = h('form', {'aria-label': 'Queue settings'},
    h('div', {class: 'fields'}, SETTINGS.map(([key, label, , hint]) => field(label, inputs[key], hint))),
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Save settings'),
      h('button', {type: 'button', class: 'secondary', onclick: () => latest && fill(latest)}, 'Reset to current')));

  function fill(settings) {
    loaded = settings;
    for (const [key] of SETTINGS) {
      const value = settings[key];
      inputs[key].value = value === null || value === undefined ? '' : String(value);
    }
  }

  actionForm(form, async () => {
    const changes = {};
    for (const [key, label, kind] of SETTINGS) {
      let value;
      if (kind === 'choice') value = inputs[key].value;
      else if (kind === 'text') value = inputs[key].value.trim() || null;
      else value = numberOrNull(inputs[key]);
      if (kind === 'required' && value === null) throw new Error(`${label} is required`);
      if (value !== loaded[key]) changes[key] = value;
    }
    if (Object.keys(changes).length === 0) return 'No changes to save.';
    const detail = await ctx.api('PATCH', `/queues/${seg(name)}`, changes);
    fill(detail.settings);
    onSaved();
    return `Saved: ${Object.keys(changes).join(', ')}.`;
  });
  /** Called by every poll: fills the form the first time only, so a poll never overwrites what is typed. */
  function seen(settings) {
    latest = settings;
    if (loaded === null) fill(settings);
  }

  return {form, seen};
}
