#!/usr/bin/env python3
"""Look for Markdown that Doxygen did not render in the built book (standard library only).

Usage: check_book_html.py HTML_DIR SOURCE_DIR

The `docs` target turns README.md, docs/benchmarks.md and chapters/*.md into pages, and
WARN_AS_ERROR catches a broken \\snippet, but Doxygen 1.9 prints many mistakes silently, as
text: a code span in a heading comes out as "<tt>qlora</tt>", **`code`** keeps its
asterisks, a double quote that spans two line breaks leaves the rest of a list item
unprocessed, a `'` inside a code span ends it as a quotation. This script reads the pages
(the HTML files that end a PageDoc block) and fails, listing page, line and text, when

  * text outside code shows Markdown syntax: a backtick, "**", *word* or _word_ emphasis,
    a Doxygen command (\\snippet, \\ref, \\image, @ref, {#...});
  * text shows an HTML tag as characters ("<tt>", "</b>", ...);
  * a paragraph line starts with "|": a table row Doxygen did not take for a table;
  * a code fragment (\\snippet or code block) is empty;
  * an image or a local link points to a file that is not there, or a link lands on the
    empty file page Doxygen makes for a Markdown file (write [docs/benchmarks.md](../docs/benchmarks.md)
    to reach its page instead);

and, in the Markdown sources, when a line inside a paragraph starts with "N. " or "+ ":
Doxygen starts a list there (GitHub does not), and the number or the plus sign vanishes.
"""
import html
import pathlib
import re
import sys

CODE_BLOCKS = [
    re.compile(r'<div class="fragment">.*?</div><!-- fragment -->', re.S),
    re.compile(r'<pre\b.*?</pre>', re.S),
    re.compile(r'<code\b.*?</code>', re.S),
    re.compile(r'<div class="ttc".*?</div></div>', re.S),
]

TEXT_CHECKS = [
    ("backtick shown as text", re.compile(r'`')),
    ('"**" shown as text', re.compile(r'\*\*')),
    ("*emphasis* not rendered", re.compile(r'(?<![\w*])\*(?=[^\s*])[^*\n]*?(?<=[^\s*])\*(?![\w*])')),
    ("_emphasis_ not rendered", re.compile(r'(?<![\w])_(?=[A-Za-z])[^_\n]*?[A-Za-z]_(?![\w])')),
    ("Doxygen command shown as text",
     re.compile(r'\\(snippet|ref|image|anchor|section|subsection|code|endcode|c|p|a|b|e|em)\b|@ref\b|\{#')),
    ("HTML tag shown as text",
     re.compile(r'</?(tt|code|b|i|em|strong|a|br|sup|sub|p|pre|span|div|img|table|tr|td|th)\b[^>]*>')),
    ("table row shown as a paragraph", re.compile(r'^\s*\|.*\|\s*$')),
]


def blank_out(match):
    """Replace a code region by a placeholder that keeps its line breaks."""
    return " [code] " + "\n" * match.group(0).count("\n")


def check_page(path, html_dir, problems):
    src = path.read_text(encoding="utf-8")
    start = src.find('<div class="contents">')
    end = src.find('<!-- contents -->')
    if start < 0:
        return
    head_lines = src.count("\n", 0, start)
    body = src[start:end if end > start else len(src)]

    for m in re.finditer(r'<div class="fragment">(.*?)</div><!-- fragment -->', body, re.S):
        if not re.sub(r"<[^>]+>|\s", "", m.group(1)):
            problems.append((path.name, head_lines + body.count("\n", 0, m.start()) + 1,
                             "empty code fragment", ""))
    for m in re.finditer(r'<(img|a)\b[^>]*?(?:src|href)="([^"#]*)[^"]*"', body):
        target = m.group(2)
        if not target or re.match(r"^[a-z]+:", target):
            continue
        line = head_lines + body.count("\n", 0, m.start()) + 1
        file = html_dir / target
        if not file.is_file():
            problems.append((path.name, line, f"{m.group(1)} points to a missing file", target))
        elif target.endswith("_8md.html"):
            problems.append((path.name, line, "link to the empty file page of a Markdown file", target))

    text = body
    for pattern in CODE_BLOCKS:
        text = pattern.sub(blank_out, text)
    text = re.sub(r"<[^>]*>", "", text)
    for n, line in enumerate(text.split("\n")):
        line = html.unescape(line)
        for what, pattern in TEXT_CHECKS:
            if pattern.search(line):
                problems.append((path.name, head_lines + n + 1, what, line.strip()))


LIST_START = re.compile(r"^ {0,3}(\d+\.|\+)\s")
ANY_LIST_ITEM = re.compile(r"^\s*(\d+[.)]|[-*+])\s")


def check_markdown(path, root, problems):
    """A paragraph line followed by "N. ..." or "+ ...": Doxygen makes it a list item."""
    fence = False
    in_list = False
    prev = ""
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.startswith("```") or line.startswith("~~~"):
            fence = not fence
            prev = ""
            continue
        if fence:
            continue
        if not prev.strip():
            in_list = bool(ANY_LIST_ITEM.match(line))
        elif ANY_LIST_ITEM.match(prev):
            in_list = True
        paragraph_line = (prev.strip() and not in_list and not prev.startswith("    ")
                          and not prev.lstrip().startswith(("|", "#", ">", "\\")))
        if paragraph_line and LIST_START.match(line) and not prev.rstrip().endswith(":"):
            problems.append((str(path.relative_to(root)), n,
                             "paragraph line starts a list in Doxygen (rewrap the line)", line.strip()))
        prev = line


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    html_dir = pathlib.Path(sys.argv[1])
    root = pathlib.Path(sys.argv[2])
    pages = sorted(p for p in html_dir.glob("*.html")
                   if "<!-- PageDoc -->" in p.read_text(encoding="utf-8", errors="replace"))
    if not pages:
        sys.exit(f"no book pages (PageDoc) in {html_dir}: build the docs target first")
    problems = []
    for page in pages:
        check_page(page, html_dir, problems)
    sources = [root / "README.md", root / "docs" / "benchmarks.md"] + sorted((root / "chapters").glob("*.md"))
    for source in sources:
        check_markdown(source, root, problems)
    for name, line, what, excerpt in problems:
        print(f"{name}:{line}: {what}: {excerpt[:160]}")
    print(f"{len(pages)} pages, {len(sources)} Markdown files: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
