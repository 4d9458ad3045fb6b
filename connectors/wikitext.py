"""Wikitext → clean plain text, with section headings kept as structure.

The Wikipedia connector embeds what a reader sees in the article body, not the markup around it.
Parsing is done by mwparserfromhell (its C tokenizer); this module only decides, node by node, what
is visible text. What it does, and why:

* **Removed**: templates (infoboxes, navboxes, citations, hatnotes, cleanup tags, pronunciation
  templates...), ``<ref>`` footnotes and their content, tables (``{| |}`` and HTML), files and
  images with their captions, categories, interlanguage links, HTML comments, galleries, timelines,
  ``<references/>``, behaviour switches (``__NOTOC__``) and arguments (``{{{1}}}``).
* **Kept**: all prose, link text (``[[Target|text]]`` → ``text``, ``[[Target]]`` → ``Target``, the
  display text of inline interwiki links such as ``[[wikt:anarchy|anarchy]]``), the text of
  formatting tags (``<b> <i> <sup> <sub> <small> <span> <code> <blockquote> <poem>``...),
  ``<nowiki>``/``<pre>``/``<syntaxhighlight>`` content, list items (one per line), and the titles of
  external links (bare URLs are dropped).
* **Inline templates that carry the words of a sentence** are rendered instead of dropped, by a
  small table (``_INLINE_TEMPLATES``): ``{{convert|5|km}}`` → ``5 km``, ``{{lang|fr|texte}}`` →
  ``texte``, ``{{nowrap|...}}``, ``{{as of|2010}}``, ``{{frac|1|2}}``, dates, dashes... Without them a
  sentence like "an area of {{convert|...}}" would read "an area of ." Every other template is dropped.
* **Math** (``<math>``, ``<chem>``) keeps its TeX source: "where <math>A</math> is the albedo" must
  still name the variable. A lone symbol becomes the symbol (``\\alpha`` → ``α``); longer TeX stays
  TeX, with adjacent brackets spaced (``}}`` → ``} }``) so it never reads as wiki markup.
* **Sections**: each heading becomes its own line with its plain text; sections left empty after
  cleaning are dropped, and so are apparatus sections whose content is links and citations, not
  prose (``References``, ``External links``, ``Further reading``, ``See also``, ``Notes``... see
  ``DEFAULT_DROP_SECTIONS``; configurable). ``CleanText.sections`` gives each kept heading's char
  offset and its path (``"History — Early life"``).

Speed: ``<ref>`` tags and HTML comments (a third of the bytes of a modern article) are removed with
one regex before parsing. That is safe because MediaWiki itself ends a ``<ref>`` at the next
``</ref>`` and a comment at the next ``-->``, exactly like the regex. ``''``/``'''`` emphasis is left
to a regex too (``skip_style_tags``), which spares the tokenizer its slowest backtracking.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import mwparserfromhell
from mwparserfromhell.nodes import (
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)

SECTION_SEPARATOR = " — "

DEFAULT_DROP_SECTIONS: tuple[str, ...] = (
    "references",
    "external links",
    "further reading",
    "see also",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "works cited",
    "notes and references",
    "references and notes",
    "bibliography and references",
)

# Namespaces whose links are not text on the page (files, categories), in English; the dump's own
# localized names are added from <siteinfo>.
_DROPPED_LINK_PREFIXES = frozenset({"file", "image", "media", "category"})
# Interwiki prefixes whose links show text inline (the link is kept, as its text).
_INTERWIKI_PREFIXES = frozenset(
    {
        "wikt", "wiktionary", "w", "wikipedia", "s", "wikisource", "q", "wikiquote", "b", "wikibooks",
        "n", "wikinews", "v", "wikiversity", "voy", "wikivoyage", "species", "wikispecies", "d",
        "wikidata", "c", "commons", "m", "meta", "mw", "mediawikiwiki", "foundation", "wmf", "phab",
    }
)
# Interlanguage links: [[de:Anarchismus]] at the end of a page (a language code, no display text).
_LANGUAGE_CODE = re.compile(r"^(?:[a-z]{2,3}(?:-[a-z0-9]{2,8})*|simple)$")

_PREPASS = re.compile(r"<!--.*?-->|<ref\b[^>]*?/\s*>|<ref\b[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_REDIRECT = re.compile(r"^\s*#\s*redirect", re.IGNORECASE)
_DISAMBIGUATION = re.compile(
    r"\{\{\s*(?:template\s*:\s*)?"
    r"(?:disambiguation|disambig|disamb|dab|dbig|hndis|geodis|numberdis|mathdab|math\s+dab|"
    r"letter[- ]number\s*comb\s*disambig|letter\s+disambiguation|species\s+latin\s+name\s+disambiguation|"
    r"genus\s+disambiguation|human\s+name\s+disambiguation|place\s+name\s+disambiguation|"
    r"mil-unit-dis|hospitaldis|schooldis|roaddis|disambiguation\s+cleanup|disambig-cleanup)"
    r"\s*(?:\||\}\})",
    re.IGNORECASE,
)

_EMPHASIS = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0\u2002\u2003\u2009\u202f]+")
_EMPTY_PARENS = re.compile(r"(?<=\s)\((?:\s|[,;:]|&nbsp;)*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])(?=\s|$)")
_LEADING_SEPARATOR = re.compile(r"\((?:\s*[,;:])+\s*(?=\S)")
_RESIDUE = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}")
_ADJACENT_BRACKETS = re.compile(r"([{}|\[\]])(?=[{}|\[\]])")

_DROP_TAGS = frozenset(
    {
        "ref", "references", "table", "gallery", "timeline", "graph", "imagemap", "templatedata",
        "mapframe", "maplink", "score", "includeonly", "inputbox", "categorytree", "indicator",
        "section", "hiero", "charinsert", "hr", "img", "style", "script", "caption", "tr", "td", "th",
    }
)
_BLOCK_TAGS = frozenset({"p", "div", "blockquote", "center", "poem", "pre", "ul", "ol", "dl", "li", "dd", "dt"})
_MATH_TAGS = frozenset({"math", "chem", "ce"})

_GREEK = {
    name: chr(code)
    for name, code in (
        ("alpha", 0x3B1), ("beta", 0x3B2), ("gamma", 0x3B3), ("delta", 0x3B4), ("epsilon", 0x3B5),
        ("varepsilon", 0x3B5), ("zeta", 0x3B6), ("eta", 0x3B7), ("theta", 0x3B8), ("vartheta", 0x3D1),
        ("iota", 0x3B9), ("kappa", 0x3BA), ("lambda", 0x3BB), ("mu", 0x3BC), ("nu", 0x3BD),
        ("xi", 0x3BE), ("pi", 0x3C0), ("rho", 0x3C1), ("sigma", 0x3C3), ("tau", 0x3C4),
        ("upsilon", 0x3C5), ("phi", 0x3C6), ("varphi", 0x3C6), ("chi", 0x3C7), ("psi", 0x3C8),
        ("omega", 0x3C9), ("Gamma", 0x393), ("Delta", 0x394), ("Theta", 0x398), ("Lambda", 0x39B),
        ("Xi", 0x39E), ("Pi", 0x3A0), ("Sigma", 0x3A3), ("Phi", 0x3A6), ("Psi", 0x3A8), ("Omega", 0x3A9),
    )
}
_TEX_SYMBOL = re.compile(r"^(?:[A-Za-z0-9.]+|\\([A-Za-z]+))$")

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
_CONVERT_SEPARATORS = {
    "-": "–", "–": "–", "to": " to ", "and": " and ", "or": " or ", "x": " × ", "×": " × ",
    "by": " by ", "+/-": " ± ", "±": " ± ", "to(-)": " to ", "and(-)": " and ", "or(-)": " or ",
}
_CONVERT_UNITS = {
    "km2": "km²", "m2": "m²", "sqkm": "km²", "sqmi": "sq mi", "sqft": "sq ft", "ft2": "sq ft",
    "m3": "m³", "cuft": "cu ft", "c": "°C", "f": "°F", "k": "K", "au": "AU", "acre": "acres",
}

# Template name → how it renders. Everything not listed is dropped.
_INLINE_TEMPLATES: dict[str, str] = {
    **dict.fromkeys(
        (
            "nowrap", "nobr", "small", "smaller", "larger", "big", "sc", "smallcaps", "small caps",
            "vanchor", "visible anchor", "sic", "abbr", "tooltip", "em", "strong", "var", "mvar",
            "math", "ill", "interlanguage link", "interlanguage link multi", "not a typo", "sup",
            "sub", "chem2", "flag", "flagcountry", "keypress", "nihongo2", "quote", "cquote",
            "blockquote", "linktext", "lang-x", "val", "oldstyledate",
        ),
        "first",
    ),
    **dict.fromkeys(("lang", "script", "rtl-lang", "audio"), "second"),
    **dict.fromkeys(("transl", "transliteration"), "last"),
    **dict.fromkeys(("chem", "sortname"), "join"),
    **dict.fromkeys(("convert", "cvt"), "convert"),
    **dict.fromkeys(("frac", "fraction", "sfrac"), "frac"),
    **dict.fromkeys(
        (
            "birth date", "death date", "birth date and age", "death date and age", "start date",
            "end date", "start date and age", "dob", "bda", "dda",
        ),
        "date",
    ),
    "as of": "as of",
    "circa": "circa",
    "c.": "circa",
    "nihongo": "nihongo",
    "angbr": "angle",
    "us$": "usd",
}
_LITERAL_TEMPLATES: dict[str, str] = {
    "nbsp": " ", "spaces": " ", "thinsp": " ", "ndash": "–", "mdash": "—", "en dash": "–",
    "em dash": "—", "snd": " – ", "spnd": " – ", "spaced ndash": " – ", "spaced en dash": " – ",
    "mdashb": "—", "'s": "'s", "'": "'", "' \"": "'\"", "\" '": "\"'", "okina": "ʻ", "middot": "·",
    "dot": "·", "bull": "•", "!": "|", "=": "=", "shy": "", "-": "",
}


def is_redirect(wikitext: str) -> bool:
    """True when the wikitext is a redirect (``#REDIRECT [[Target]]``)."""
    return _REDIRECT.match(wikitext) is not None


def is_disambiguation(title: str, wikitext: str) -> bool:
    """True for a disambiguation page: a ``(disambiguation)`` title or a disambiguation template.

    The templates are those that put a page in Wikipedia's "Disambiguation pages" category
    (``{{disambiguation}}``, ``{{disambig}}``, ``{{dab}}``, ``{{hndis}}``, ``{{geodis}}``...); the
    inline cleanup tag ``{{disambiguation needed}}`` is not one of them.
    """
    return title.rstrip().endswith("(disambiguation)") or _DISAMBIGUATION.search(wikitext) is not None


@dataclass(slots=True)
class CleanText:
    """A page's clean text and where its sections start.

    Attributes:
        text: Plain text: the lead, then each section as its heading line followed by its
            paragraphs, blocks separated by blank lines.
        sections: ``[char_offset, "Heading — Subheading"]`` for each heading line kept in ``text``;
            ``text[offset:]`` starts with the last element of the path.
    """

    text: str
    sections: list[list[int | str]] = field(default_factory=list)


@dataclass(slots=True)
class _Section:
    level: int
    heading: str
    parts: list[str]
    body: str = ""


class WikitextCleaner:
    """Turns one page's wikitext into ``CleanText``; built once per dump (from its namespaces).

    Args:
        file_namespaces: Localized names of the dump's File/Media/Category namespaces (and their
            aliases), whose links are dropped; the English names are always included.
        site_namespaces: All namespace names of the dump, so ``[[Talk:X]]`` is not mistaken for an
            interlanguage link.
        drop_sections: Headings (any level, case-insensitive) whose section, subsections included,
            is removed. Empty keeps every section.

    Example:
        >>> cleaner = WikitextCleaner()
        >>> page = cleaner.clean("'''Albedo''' is [[reflection|reflectivity]].<ref>x</ref>\\n== Terrestrial ==\\nSnow.")
        >>> page.text
        'Albedo is reflectivity.\\n\\nTerrestrial\\n\\nSnow.'
        >>> page.sections
        [[25, 'Terrestrial']]
    """

    __slots__ = ("_dropped_prefixes", "_site_namespaces", "_drop_sections")

    def __init__(
        self,
        file_namespaces: Iterable[str] = (),
        site_namespaces: Iterable[str] = (),
        drop_sections: Iterable[str] = DEFAULT_DROP_SECTIONS,
    ) -> None:
        self._dropped_prefixes = _DROPPED_LINK_PREFIXES | {n.strip().lower() for n in file_namespaces if n}
        self._site_namespaces = frozenset(n.strip().lower() for n in site_namespaces if n)
        self._drop_sections = frozenset(_normalize_heading(h) for h in drop_sections)

    def clean(self, wikitext: str) -> CleanText:
        """Cleans one page. Returns empty text when nothing readable is left."""
        code = mwparserfromhell.parse(_PREPASS.sub("", wikitext), skip_style_tags=True)
        sections = [_Section(0, "", [])]
        for node in code.nodes:
            if type(node) is Heading:
                heading = _tidy_line(self._render_to_str(node.title.nodes))
                sections.append(_Section(node.level, heading, []))
            else:
                self._render_node(node, sections[-1].parts)
        for section in sections:
            section.body = _tidy_block("".join(section.parts))
        return self._assemble(sections)

    # --- rendering ----------------------------------------------------------------------------

    def _render_to_str(self, nodes: list) -> str:
        out: list[str] = []
        for node in nodes:
            self._render_node(node, out)
        return "".join(out)

    def _render_node(self, node: object, out: list[str]) -> None:
        kind = type(node)
        if kind is Text:
            out.append(node.value)  # type: ignore[attr-defined]
        elif kind is Wikilink:
            self._render_link(node, out)  # type: ignore[arg-type]
        elif kind is Template:
            self._render_template(node, out)  # type: ignore[arg-type]
        elif kind is Tag:
            self._render_tag(node, out)  # type: ignore[arg-type]
        elif kind is HTMLEntity:
            out.append(node.normalize())  # type: ignore[attr-defined]
        elif kind is ExternalLink:
            if node.title is not None:  # type: ignore[attr-defined]
                for child in node.title.nodes:  # type: ignore[attr-defined]
                    self._render_node(child, out)
        elif kind is Heading:  # a heading nested in a tag: keep it as a line
            out.append("\n")
            for child in node.title.nodes:  # type: ignore[attr-defined]
                self._render_node(child, out)
            out.append("\n")
        # Comment, Argument: not visible

    def _render_link(self, node: Wikilink, out: list[str]) -> None:
        title = str(node.title).strip()
        leading_colon = title.startswith(":")
        target = title.lstrip(":").strip()
        display = target
        if ":" in target:
            prefix, rest = target.split(":", 1)
            prefix = prefix.strip().lower()
            if prefix in self._dropped_prefixes:
                if not leading_colon:
                    return
            elif prefix in _INTERWIKI_PREFIXES:
                display = rest.strip()
            elif (
                not leading_colon
                and node.text is None
                and _LANGUAGE_CODE.match(prefix)
                and prefix not in self._site_namespaces
            ):
                return  # interlanguage link
        if node.text is not None:
            start = len(out)
            for child in node.text.nodes:
                self._render_node(child, out)
            if any(part.strip() for part in out[start:]):
                return
            del out[start:]
        out.append(display)

    def _render_tag(self, node: Tag, out: list[str]) -> None:
        name = str(node.tag).strip().lower()
        if node.wiki_markup is not None and name in ("li", "dt", "dd"):
            return  # list markers at line start: the item's text follows as sibling nodes
        if name in _DROP_TAGS:
            return
        if name == "br":
            out.append("\n")
            return
        contents = node.contents
        if contents is None:
            return
        if name in _MATH_TAGS:
            out.append(_math_text(str(contents)))
            return
        block = name in _BLOCK_TAGS
        if block:
            out.append("\n")
        for child in contents.nodes:
            self._render_node(child, out)
        if block:
            out.append("\n")

    def _render_template(self, node: Template, out: list[str]) -> None:
        name = _normalize_heading(str(node.name))
        literal = _LITERAL_TEMPLATES.get(name)
        if literal is not None:
            out.append(literal)
            return
        rule = _INLINE_TEMPLATES.get(name)
        if rule is None:
            if not name.startswith("lang-"):
                return
            rule = "first"
        args = [self._render_to_str(p.value.nodes).strip() for p in node.params if not p.showkey]
        text = _apply_template_rule(rule, args, node)
        if text:
            out.append(text)

    # --- assembling ---------------------------------------------------------------------------

    def _assemble(self, sections: list[_Section]) -> CleanText:
        keep = [True] * len(sections)
        # Apparatus sections (References, External links...) go, with their subsections.
        dropping_below: int | None = None
        for i, section in enumerate(sections[1:], start=1):
            if dropping_below is not None and section.level > dropping_below:
                keep[i] = False
                continue
            dropping_below = None
            if _normalize_heading(section.heading) in self._drop_sections:
                keep[i] = False
                dropping_below = section.level
        # A heading stays only if its section, or one of its subsections, has text.
        has_text = [False] * len(sections)
        for i in range(len(sections) - 1, 0, -1):
            if not keep[i]:
                continue
            has_text[i] = bool(sections[i].body)
            j = i + 1
            while not has_text[i] and j < len(sections) and sections[j].level > sections[i].level:
                has_text[i] = has_text[j]
                j += 1
        blocks: list[str] = []
        offsets: list[list[int | str]] = []
        length = 0
        path: list[tuple[int, str]] = []

        def add(block: str) -> int:
            nonlocal length
            if blocks:
                length += 2
            start = length
            blocks.append(block)
            length += len(block)
            return start

        if sections[0].body:
            add(sections[0].body)
        for i, section in enumerate(sections[1:], start=1):
            if not keep[i] or not has_text[i]:
                continue
            if section.heading:
                while path and path[-1][0] >= section.level:
                    path.pop()
                path.append((section.level, section.heading))
                offsets.append([add(section.heading), SECTION_SEPARATOR.join(h for _, h in path)])
            if section.body:
                add(section.body)
        return CleanText("\n\n".join(blocks), offsets)


# --- helpers ----------------------------------------------------------------------------------


def _normalize_heading(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def _tidy_line(text: str) -> str:
    text = _EMPHASIS.sub("", text)
    text = _RESIDUE.sub("", text)
    return _SPACES.sub(" ", text.replace("\n", " ")).strip()


def _tidy_block(raw: str) -> str:
    """Whitespace and leftovers: lines stripped, runs of spaces collapsed, blank lines between
    paragraphs (at most one), empty ``( )`` left by removed templates dropped."""
    raw = _MAGIC_WORD.sub("", _EMPHASIS.sub("", raw))
    raw = _RESIDUE.sub("", raw)
    paragraphs: list[str] = []
    current: list[str] = []
    for line in raw.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if line:
            line = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", line))
            line = _LEADING_SEPARATOR.sub("(", line)
            line = _SPACES.sub(" ", line).strip()
        if line and any(ch.isalnum() for ch in line):
            current.append(line)
        elif not line and current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return "\n\n".join(paragraphs)


def _math_text(tex: str) -> str:
    tex = tex.strip()
    while len(tex) > 1 and tex[0] == "{" and tex[-1] == "}" and _balanced(tex[1:-1]):
        tex = tex[1:-1].strip()
    symbol = _TEX_SYMBOL.match(tex)
    if symbol is not None:
        return _GREEK.get(symbol.group(1), tex) if symbol.group(1) else tex
    return _ADJACENT_BRACKETS.sub(r"\1 ", tex)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _apply_template_rule(rule: str, args: list[str], node: Template) -> str:
    if rule == "first":
        return args[0] if args else ""
    if rule == "second":
        return args[1] if len(args) > 1 else ""
    if rule == "last":
        return args[-1] if args else ""
    if rule == "join":
        return ("" if node.name.strip().lower() == "chem" else " ").join(a for a in args if a)
    if rule == "convert":
        return _convert_text(args)
    if rule == "frac":
        if len(args) == 3:
            return f"{args[0]} {args[1]}/{args[2]}"
        return "/".join(args[:2]) if len(args) >= 2 else (f"1/{args[0]}" if args else "")
    if rule == "date":
        return _date_text(args, _named(node, "df"))
    if rule == "as of":
        date = _date_text(args, None, day=False)
        lead = "as of" if _named(node, "lc") else "As of"
        return f"{lead} {date}" if date else ""
    if rule == "circa":
        return f"c. {args[0]}" if args else "c."
    if rule == "nihongo":
        rest = ", ".join(a for a in args[1:3] if a)
        return f"{args[0]} ({rest})" if args and rest else (args[0] if args else "")
    if rule == "angle":
        return f"⟨{args[0]}⟩" if args else ""
    if rule == "usd":
        return f"US${args[0]}" if args else "US$"
    return ""


def _named(node: Template, key: str) -> str | None:
    if node.has(key):
        value = str(node.get(key).value).strip()
        return value or None
    return None


def _convert_text(args: list[str]) -> str:
    if not args:
        return ""
    text = args[0]
    i = 1
    while i + 1 < len(args) and args[i] in _CONVERT_SEPARATORS:
        text += _CONVERT_SEPARATORS[args[i]] + args[i + 1]
        i += 2
    if i < len(args):
        unit = args[i]
        text += " " + _CONVERT_UNITS.get(unit.lower(), unit)
    return text


def _date_text(args: list[str], day_first: str | None, day: bool = True) -> str:
    numbers = [a for a in args[:3] if a]
    if not numbers or not all(a.isdigit() for a in numbers):
        return " ".join(numbers)
    year = numbers[0]
    month = _MONTHS[int(numbers[1]) - 1] if len(numbers) > 1 and 1 <= int(numbers[1]) <= 12 else ""
    if not month:
        return year
    if not day or len(numbers) < 3:
        return f"{month} {year}"
    d = str(int(numbers[2]))
    return f"{d} {month} {year}" if day_first else f"{month} {d}, {year}"
