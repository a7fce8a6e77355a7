"""The readable API page (GET /api): HTML rendered by the server from the OpenAPI document, one section per
tag, each operation with its parameters, body and responses, then every schema with its fields.

Invariants: self-contained (inline CSS, no script, nothing fetched from the network); every text taken from the
document is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:1rem 2rem;color:#1d2330}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #d5dae3;padding-bottom:.2rem;margin-top:2.5rem}
.op{border:1px solid #d5dae3;border-radius:6px;margin:1rem 0;padding:.6rem 1rem}
.op h3{margin:.2rem 0;font-size:1rem;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:4.2rem;border-radius:4px;color:#fff;text-align:center;margin-right:.6rem}
.GET{background:#2f6fb3}.POST{background:#2e8540}.PUT{background:#946200}.PATCH{background:#6b4fa3}
.DELETE{background:#b3261e}
table{border-collapse:collapse;margin:.4rem 0;width:100%} th,td{text-align:left;padding:.2rem .6rem;
vertical-align:top;border-bottom:1px solid #e6e9ef} code{font-family:ui-monospace,monospace;font-size:.92em}
a{color:#2f6fb3} .muted{color:#5b6475}
"""


def render(doc: dict[str, Any]) -> str:
    """The whole page for an OpenAPI document."""
    info = doc["info"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{escape(info['title'])}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{escape(info['title'])}</h1><p class='muted'>version {escape(info['version'])} · OpenAPI "
        f"{escape(doc['openapi'])} · machine-readable: <a href='/openapi.json'>/openapi.json</a></p>",
        f"<p>{escape(info.get('description', ''))}</p>",
        "<p>Credentials: <code>Authorization: Bearer &lt;token&gt;</code> or <code>Authorization: Basic "
        '&lt;user:password&gt;</code> (none needed while auth is off). Errors are JSON: <code>{"error": '
        '{"name", "code", "message", "retryable"}}</code>.</p>',
    ]
    operations = [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]
    parts.append("<nav><ul>")
    parts += [f"<li><a href='#{escape(tag['name'])}'>{escape(tag['name'])}</a></li>" for tag in doc["tags"]]
    parts.append("<li><a href='#schemas'>schemas</a></li></ul></nav>")
    for tag in doc["tags"]:
        name = tag["name"]
        parts.append(f"<h2 id='{escape(name)}'>{escape(name)}</h2>")
        parts += [_operation(path, method, op) for path, method, op in operations if name in op.get("tags", ())]
    parts.append("<h2 id='schemas'>schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        parts.append(_schema(name, schema))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    verb = method.upper()
    html = [
        f"<section class='op' id='{escape(op['operationId'])}'>",
        f"<h3><span class='m {verb}'>{verb}</span>{escape(path)}</h3>",
        f"<p>{escape(op['summary'])}</p>",
    ]
    if op.get("description"):
        html.append(f"<p class='muted'>{_inline(op['description'])}</p>")
    if op.get("parameters"):
        html.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>meaning</th></tr>")
        for param in op["parameters"]:
            required = "" if param.get("required") else " (optional)"
            name, where, meaning = escape(param["name"]), escape(param["in"]), escape(param.get("description", ""))
            html.append(f"<tr><td><code>{name}</code>{required}</td><td>{where}</td>"
                        f"<td>{_type(param['schema'])}</td><td>{meaning}</td></tr>")  # fmt: skip
        html.append("</table>")
    body = op.get("requestBody")
    if body is not None:
        optional = "" if body.get("required") else " (optional: an empty body takes the defaults)"
        html.append(f"<p>Request body: {_type(body['content']['application/json']['schema'])}{optional}</p>")
    html.append("<table><tr><th>status</th><th>body</th><th>when</th></tr>")
    for status, response in op["responses"].items():
        content = response.get("content", {}).get("application/json")
        shape = _type(content["schema"]) if content else "<span class='muted'>none</span>"
        html.append(f"<tr><td>{escape(status)}</td><td>{shape}</td><td>{_inline(response['description'])}</td></tr>")
    html.append("</table></section>")
    return "\n".join(html)


def _schema(name: str, schema: dict[str, Any]) -> str:
    html = [f"<section class='op' id='schema-{escape(name)}'><h3>{escape(name)}</h3>"]
    if schema.get("description"):
        html.append(f"<p>{escape(schema['description'])}</p>")
    properties = schema.get("properties", {})
    if properties:
        required = set(schema.get("required", ()))
        html.append("<table><tr><th>field</th><th>type</th><th>default</th></tr>")
        for field, spec in properties.items():
            default = "required" if field in required else escape(repr(spec.get("default", "–")))
            html.append(f"<tr><td><code>{escape(field)}</code></td><td>{_type(spec)}</td><td>{default}</td></tr>")
        html.append("</table>")
    elif "enum" in schema:
        html.append(f"<p>{_type(schema)}</p>")
    html.append("</section>")
    return "\n".join(html)


def _type(schema: dict[str, Any]) -> str:
    """A short readable type: a link for a $ref, `a | b` for unions, `[item]` for arrays, ranges in brackets."""
    if "$ref" in schema:
        name = escape(schema["$ref"].rsplit("/", 1)[-1])
        return f"<a href='#schema-{name}'>{name}</a>"
    if "anyOf" in schema:
        return " | ".join(_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(f"<code>{escape(repr(value))}</code>" for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"[{_type(schema.get('items', {}))}]"
    if kind == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"{{str: {_type(schema['additionalProperties'])}}}"
    limits = [f"{word} {schema[key]}" for key, word in (("minimum", "≥"), ("exclusiveMinimum", ">"),
                                                        ("maximum", "≤"), ("maxLength", "≤"),
                                                        ("maxItems", "≤")) if key in schema]  # fmt: skip
    text = escape(str(kind))
    return text + (f" <span class='muted'>({escape(', '.join(limits))})</span>" if limits else "")


def _inline(text: str) -> str:
    """Escape, then show `code` spans as code."""
    pieces = escape(text).split("`")
    return "".join(f"<code>{piece}</code>" if i % 2 else piece for i, piece in enumerate(pieces))
