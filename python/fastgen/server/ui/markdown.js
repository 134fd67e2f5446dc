// Markdown for model answers, rendered to DOM nodes. Text only ever becomes text nodes (no
// innerHTML anywhere), so HTML a model writes shows as what it is: text.
//
// Covers what chat models write: fenced code (while an answer streams in, an unclosed fence runs
// to the end), ATX headings, paragraphs (a single newline is a line break, as in chat apps),
// bullet and numbered lists nested by indentation, block quotes, pipe tables, rules; inline
// `code`, **strong**, *emphasis*, ~~strike~~, [links](https://…), <autolinks> and bare URLs.
// Links go to http(s) and mailto only; images are shown as links (the page fetches nothing).

const FENCE = /^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}>[ ]?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
const TABLE_RULE = /^[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const ESCAPABLE = "\\`*_{}[]()#+-.!|~<>\"'";
const SAFE_URL = /^(https?:|mailto:)/i;

/** The markdown text as a DocumentFragment. */
export function render(markdown) {
  const fragment = document.createDocumentFragment();
  blocks(markdown.replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n"), fragment);
  return fragment;
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

function blank(line) {
  return line.trim() === "";
}

function isTable(lines, i) {
  return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
    TABLE_RULE.test(lines[i + 1]);
}

/** Whether lines[i] opens a block other than a paragraph (and so ends a paragraph). */
function opensBlock(lines, i) {
  const line = lines[i];
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    interruptsWithItem(line) || isTable(lines, i);
}

/** A list item can start right under a paragraph line: a bullet, or a numbered list at 1. */
function interruptsWithItem(line) {
  const m = ITEM.exec(line);
  return m !== null && !blank(m[3] ?? "") && (!/\d/.test(m[2]) || /^1[.)]$/.test(m[2]));
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (blank(line)) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const [, indent, fence, lang] = m;
      const body = [];
      for (i++; i < lines.length && !closesFence(lines[i], fence); i++) {
        body.push(lines[i].slice(Math.min(indent.length, indentOf(lines[i]))));
      }
      i++;  // the closing fence, or past the end
      parent.append(codeBlock(body.join("\n"), lang));
    } else if ((m = HEADING.exec(line))) {
      const heading = el(`h${m[1].length}`);
      inline(m[2] ?? "", heading);
      parent.append(heading);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && !blank(lines[i]); i++) {
        const quoted = QUOTE.exec(lines[i]);
        if (!quoted && opensBlock(lines, i)) break;
        inner.push(quoted ? quoted[1] : lines[i]);  // a lazy line continues the quote
      }
      const quote = el("blockquote");
      blocks(inner, quote);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else if (isTable(lines, i)) {
      i = table(lines, i, parent);
    } else {
      const paragraph = [line.trim()];
      for (i++; i < lines.length && !blank(lines[i]) && !opensBlock(lines, i); i++) {
        paragraph.push(lines[i].trim());
      }
      const p = el("p");
      paragraph.forEach((text, k) => {
        if (k) p.append(el("br"));
        inline(text, p);
      });
      parent.append(p);
    }
  }
}

function closesFence(line, fence) {
  const trimmed = line.trim();
  return trimmed.length >= fence.length && trimmed === fence[0].repeat(trimmed.length) &&
    indentOf(line) < 4;
}

function codeBlock(text, lang) {
  const pre = el("pre");
  const code = el("code", lang ? `language-${lang}` : "");
  code.textContent = text;
  if (lang) {
    const label = el("span", "lang");
    label.textContent = lang;
    pre.append(label);
  }
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Select to copy";  // no clipboard outside secure contexts
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  pre.append(copy, code);
  return pre;
}

/** The list starting at lines[i] into parent; returns the index of the line after it. */
function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  const sameList = (m) => m && m[1].length === indent && /\d/.test(m[2]) === ordered;
  let loose = false;
  while (i < lines.length) {
    let m = ITEM.exec(lines[i]);
    if (!sameList(m)) {
      // Blank lines between two items of this list keep it going (a loose list).
      let j = i;
      while (j < lines.length && blank(lines[j])) j++;
      if (j === i || j === lines.length || !sameList(ITEM.exec(lines[j]))) break;
      loose = true;
      i = j;
      m = ITEM.exec(lines[i]);
    }
    const content = [m[3] ?? ""];
    const contentIndent = m[1].length + m[2].length + 1;
    for (i++; i < lines.length; i++) {
      const line = lines[i];
      if (blank(line)) {
        let j = i;
        while (j < lines.length && blank(lines[j])) j++;
        if (j < lines.length && indentOf(lines[j]) > indent) {
          content.push("");
          loose = true;
          continue;
        }
        break;
      }
      if (indentOf(line) > indent) {
        content.push(line.slice(Math.min(indentOf(line), contentIndent)));
      } else if (ITEM.test(line) || opensBlock(lines, i)) {
        break;
      } else {
        content.push(line.trim());  // a lazy continuation line
      }
    }
    const item = el("li");
    blocks(content, item);
    node.append(item);
  }
  if (!loose) {  // a tight list: its items' paragraphs are just their text
    for (const p of node.querySelectorAll(":scope > li > p")) p.replaceWith(...p.childNodes);
  }
  parent.append(node);
  return i;
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  const out = [""];
  for (let k = 0; k < row.length; k++) {
    if (row[k] === "\\" && row[k + 1] === "|") {
      out[out.length - 1] += "|";
      k++;
    } else if (row[k] === "|") {
      out.push("");
    } else {
      out[out.length - 1] += row[k];
    }
  }
  return out.map((cell) => cell.trim());
}

function table(lines, i, parent) {
  const header = cells(lines[i]);
  const align = cells(lines[i + 1]).map((rule) =>
    rule.startsWith(":") && rule.endsWith(":") ? "center" : rule.endsWith(":") ? "right" :
      rule.startsWith(":") ? "left" : "");
  const node = el("table");
  const row = (texts, tag) => {
    const tr = el("tr");
    header.forEach((_, k) => {
      const cell = el(tag);
      if (align[k]) cell.style.textAlign = align[k];
      inline(texts[k] ?? "", cell);
      tr.append(cell);
    });
    return tr;
  };
  const head = el("thead");
  head.append(row(header, "th"));
  const body = el("tbody");
  for (i += 2; i < lines.length && !blank(lines[i]) && lines[i].includes("|"); i++) {
    body.append(row(cells(lines[i]), "td"));
  }
  node.append(head, body);
  parent.append(node);
  return i;
}

/** Inline markdown of text appended to parent. */
function inline(text, parent) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(plain);
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && ESCAPABLE.includes(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    const run = runAt(text, i);
    if (c === "`") {
      const end = findRun(text, c, run, i + run);
      if (end < 0) {
        plain += text.slice(i, i + run);
        i += run;
        continue;
      }
      flush();
      const code = el("code");
      const inner = text.slice(i + run, end);
      code.textContent = /^ .*[^ ].* $/.test(inner) ? inner.slice(1, -1) : inner;
      parent.append(code);
      i = end + run;
      continue;
    }
    if (c === "*" || c === "_" || c === "~") {
      const span = emphasis(text, i, run);
      if (span === null) {
        plain += text.slice(i, i + run);
        i += run;
        continue;
      }
      flush();
      let node = parent;
      for (const tag of span.tags) {
        const child = el(tag);
        node.append(child);
        node = child;
      }
      inline(span.inner, node);
      i = span.end;
      continue;
    }
    if (c === "[" || (c === "!" && text[i + 1] === "[")) {
      const link = linkAt(text, c === "!" ? i + 1 : i);
      if (link !== null) {
        flush();
        parent.append(anchor(link.href, link.label, c === "!"));
        i = link.end;
        continue;
      }
    }
    if (c === "<") {
      const m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(text.slice(i));
      if (m) {
        flush();
        parent.append(anchor(m[1], null, false));
        i += m[0].length;
        continue;
      }
    }
    if ((c === "h" || c === "H") && !/\w/.test(text[i - 1] ?? "")) {
      const m = /^https?:\/\/[^\s<>"]+/i.exec(text.slice(i, i + 4096));
      if (m) {
        const url = trimUrl(m[0]);
        flush();
        parent.append(anchor(url, null, false));
        i += url.length;
        continue;
      }
    }
    plain += c;
    i++;
  }
  flush();
}

function runAt(text, i) {
  let n = 1;
  while (text[i + n] === text[i]) n++;
  return n;
}

/** The start of the next run of exactly n c's at or after from, or -1. */
function findRun(text, c, n, from) {
  for (let j = text.indexOf(c, from); j >= 0; j = text.indexOf(c, j)) {
    const run = runAt(text, j);
    if (run === n) return j;
    j += run;
  }
  return -1;
}

const EMPHASIS = {"*": [["em"], ["strong"], ["strong", "em"]],
                  "_": [["em"], ["strong"], ["strong", "em"]],
                  "~": [null, ["del"]]};

/** The emphasis span whose opening run of n delimiters starts at text[i], or null. */
function emphasis(text, i, n) {
  const c = text[i];
  const tags = EMPHASIS[c][Math.min(n, 3) - 1];
  const after = text[i + n] ?? "";
  if (!tags || n > 3 || after === "" || /\s/.test(after)) return null;
  if (c === "_" && /[\p{L}\p{N}]/u.test(text[i - 1] ?? "")) return null;  // snake_case
  for (let j = findRun(text, c, n, i + n); j >= 0; j = findRun(text, c, n, j + n)) {
    const next = text[j + n] ?? "";
    if (/\s/.test(text[j - 1]) || (c === "_" && /[\p{L}\p{N}]/u.test(next))) continue;
    return {tags, inner: text.slice(i + n, j), end: j + n};
  }
  return null;
}

/** [label](href) starting at text[i] === "[", or null. */
function linkAt(text, i) {
  let depth = 0;
  let close = -1;
  for (let k = i; k < text.length; k++) {
    if (text[k] === "\\") k++;
    else if (text[k] === "[") depth++;
    else if (text[k] === "]" && --depth === 0) {
      close = k;
      break;
    }
  }
  if (close < 0 || text[close + 1] !== "(") return null;
  depth = 0;
  for (let k = close + 1; k < text.length; k++) {
    if (text[k] === "(") depth++;
    else if (text[k] === ")" && --depth === 0) {
      const target = text.slice(close + 2, k).trim();
      const href = (target.match(/^<([^>]*)>/)?.[1] ?? target.split(/\s+/)[0]);
      return {label: text.slice(i + 1, close), href, end: k + 1};
    }
  }
  return null;
}

function trimUrl(url) {
  let end = url.length;
  while (end > 0 && ".,;:!?'\"*_~".includes(url[end - 1])) end--;
  url = url.slice(0, end);
  // A closing parenthesis belongs to the URL only when it has an opening one: (see https://x).
  while (url.endsWith(")") && (url.match(/\(/g)?.length ?? 0) < (url.match(/\)/g)?.length ?? 0)) {
    url = url.slice(0, -1);
  }
  return url;
}

function anchor(href, label, image) {
  if (!SAFE_URL.test(href)) {  // javascript:, data:, relative: the label alone, as text
    const span = el("span");
    inline(label ?? href, span);
    return span;
  }
  const a = el("a", image ? "image" : "");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  if (label === null) a.textContent = href;
  else if (image) a.textContent = `[image: ${label || href}]`;
  else inline(label, a);
  return a;
}
