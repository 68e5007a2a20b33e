// The API page (/docs): /openapi.json drawn as plain HTML, in place of FastAPI's Swagger UI (whose scripts come from
// a CDN and leave a blank page offline). Nothing here is loaded from another site; every text goes in as text.
"use strict";

const $ = (id) => document.getElementById(id);
const METHODS = ["get", "post", "put", "patch", "delete"];

// el("td", {className: "x"}, "text", node, ...): an element with properties and children (strings become text).
function el(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== ""));
  return node;
}

// Text with `code` spans, as FastAPI descriptions are written.
function prose(text, tag = "p") {
  const node = el(tag);
  String(text || "")
    .split(/(`[^`]+`)/)
    .forEach((part) => node.append(part.startsWith("`") && part.endsWith("`") ? el("code", {}, part.slice(1, -1)) : part));
  return node;
}

const refName = (ref) => ref.split("/").pop();
const anchor = (kind, name) => `${kind}-${name.replace(/[^\w-]+/g, "-")}`;

function schemaOf(spec, schema) {
  return schema && schema.$ref ? spec.components.schemas[refName(schema.$ref)] || {} : schema || {};
}

// A schema's type in a few words, with links to the named schemas: "array of SearchResult", "string | null".
function typeNode(spec, schema) {
  schema = schema || {};
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return el("a", { href: "#" + anchor("schema", name), className: "type" }, name);
  }
  const span = el("span", { className: "type" });
  const variants = schema.anyOf || schema.oneOf;
  if (variants) {
    variants.forEach((variant, i) => span.append(...(i ? [" | "] : []), typeNode(spec, variant)));
    return span;
  }
  if (schema.type === "array") {
    span.append("array of ", typeNode(spec, schema.items));
  } else if (schema.type === "object" && schema.additionalProperties && schema.additionalProperties !== true) {
    span.append("object of ", typeNode(spec, schema.additionalProperties));
  } else if (schema.type === "string" && (schema.format === "binary" || schema.contentMediaType)) {
    span.append("file");
  } else {
    span.append(schema.type || (schema.enum ? "enum" : "any"));
  }
  return span;
}

// Bounds, patterns, defaults and allowed values of a schema, as text.
function constraints(schema) {
  schema = schema || {};
  const variants = schema.anyOf || schema.oneOf || [];
  const inner = variants.find((v) => v.type && v.type !== "null") || {};
  const merged = { ...inner, ...schema };
  const parts = [];
  if (merged.minimum !== undefined) parts.push(`≥ ${merged.minimum}`);
  if (merged.exclusiveMinimum !== undefined) parts.push(`> ${merged.exclusiveMinimum}`);
  if (merged.maximum !== undefined) parts.push(`≤ ${merged.maximum}`);
  if (merged.exclusiveMaximum !== undefined) parts.push(`< ${merged.exclusiveMaximum}`);
  if (merged.minLength !== undefined) parts.push(`at least ${merged.minLength} characters`);
  if (merged.maxLength !== undefined) parts.push(`at most ${merged.maxLength} characters`);
  if (merged.pattern !== undefined) parts.push(`matches ${merged.pattern}`);
  if (merged.enum) parts.push(`one of ${merged.enum.map((v) => JSON.stringify(v)).join(", ")}`);
  if (merged.default !== undefined && merged.default !== null) parts.push(`default ${JSON.stringify(merged.default)}`);
  return parts.join("; ");
}

function table(headings, rows) {
  return el(
    "div",
    { className: "table-wrap" },
    el("table", {}, el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", {}, h)))), el("tbody", {}, ...rows)),
  );
}

function fieldRow(spec, name, schema, required, where) {
  const description = schema.description || "";
  const limits = constraints(schema);
  const cells = [
    el("td", {}, el("code", {}, name), required ? el("div", { className: "required" }, "required") : null),
  ];
  if (where !== undefined) cells.push(el("td", {}, where));
  cells.push(
    el("td", {}, typeNode(spec, schema)),
    el("td", {}, prose(description, "span"), limits ? el("div", { className: "hint" }, limits) : null),
  );
  return el("tr", {}, ...cells);
}

function parametersTable(spec, parameters) {
  const rows = parameters.map((p) => {
    const schema = { ...(p.schema || {}), description: p.description || (p.schema || {}).description };
    return fieldRow(spec, p.name, schema, p.required, p.in);
  });
  return table(["name", "in", "type", "description"], rows);
}

function propertiesTable(spec, schema) {
  const required = new Set(schema.required || []);
  const rows = Object.entries(schema.properties || {}).map(([name, property]) =>
    fieldRow(spec, name, property, required.has(name)),
  );
  return table(["field", "type", "description"], rows);
}

function requestBody(spec, body) {
  const parts = [el("h3", {}, "Request body", body.required ? el("span", { className: "required" }, " required") : null)];
  for (const [type, content] of Object.entries(body.content || {})) {
    parts.push(el("p", {}, el("code", {}, type)));
    const schema = schemaOf(spec, content.schema);
    if (schema.properties) parts.push(propertiesTable(spec, schema));
    else parts.push(el("p", {}, typeNode(spec, content.schema)));
  }
  return parts;
}

function responses(spec, answers) {
  const rows = Object.entries(answers || {}).map(([status, answer]) => {
    const contents = Object.entries(answer.content || {});
    const body = contents.length
      ? contents.map(([type, content]) =>
          el("div", {}, el("code", {}, type), content.schema ? el("span", {}, ": ", typeNode(spec, content.schema)) : null),
        )
      : [el("span", { className: "hint" }, "no body described")];
    return el("tr", {}, el("td", {}, el("code", {}, status)), el("td", {}, answer.description || ""), el("td", {}, ...body));
  });
  return [el("h3", {}, "Responses"), table(["status", "meaning", "body"], rows)];
}

function operation(spec, path, method, op) {
  const id = anchor("op", `${method}-${path}`);
  const section = el("section", { id, className: "op" });
  section.dataset.method = method.toUpperCase();
  section.dataset.path = path;
  section.append(
    el("div", { className: "op-head" }, el("span", { className: `method ${method}` }, method.toUpperCase()), el("h2", {}, path)),
  );
  if (op.summary) section.append(prose(op.summary));
  if (op.description && op.description !== op.summary) section.append(prose(op.description));
  if (op.parameters && op.parameters.length) section.append(el("h3", {}, "Parameters"), parametersTable(spec, op.parameters));
  if (op.requestBody) section.append(...requestBody(spec, op.requestBody));
  section.append(...responses(spec, op.responses));
  $("toc-list").append(
    el("li", {}, el("a", { href: "#" + id }, el("span", { className: `method ${method}` }, method.toUpperCase()), " ", el("code", {}, path))),
  );
  return section;
}

function render(spec) {
  document.title = `${spec.info.title} ${spec.info.version}: the JSON API`;
  $("api-info").textContent = `${spec.info.title} ${spec.info.version} · OpenAPI ${spec.openapi}`;
  $("api-description").replaceChildren(...prose(spec.info.description || "").childNodes);
  const operations = [];
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const method of METHODS) if (item[method]) operations.push(operation(spec, path, method, item[method]));
  }
  $("endpoints").replaceChildren(...operations);
  // Form bodies are shown with their endpoint; the other schemas are what the endpoints answer.
  const schemas = Object.entries((spec.components || {}).schemas || {}).filter(([name]) => !name.startsWith("Body_"));
  $("schemas").replaceChildren(
    ...schemas.map(([name, schema]) =>
      el(
        "section",
        { id: anchor("schema", name), className: "schema" },
        el("h2", {}, "Schema ", el("code", {}, name)),
        schema.description ? prose(schema.description) : null,
        schema.properties ? propertiesTable(spec, schema) : el("p", {}, typeNode(spec, schema)),
      ),
    ),
  );
  document.body.dataset.state = "done";
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

fetch("/openapi.json")
  .then((response) => {
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    return response.json();
  })
  .then(render)
  .catch((error) => {
    $("api-status").textContent = `cannot read /openapi.json: ${error.message}`;
    document.body.dataset.state = "error";
  });
