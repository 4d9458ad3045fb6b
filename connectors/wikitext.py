"""Wikitext → clean plain text, with section headings kept as structure.

The Wikipedia connector embeds what a reader sees in the article body, not the markup around it.
Parsing is done by mwparserfromhell's tokenizer (its C extension); this module only decides, token
by token, what is visible text. What it does, and why:

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

Speed. mwparserfromhell parses in two steps: its C tokenizer turns wikitext into a flat list of
tokens (``mwparserfromhell.parser.tokens``), then a pure-Python builder turns them into a tree of
node objects. The builder takes about 85% of the time, and a text extractor throws the tree away at
once. So the cleaner renders the token list directly, keeping one stack of the constructs open at
each point (template, link, tag, heading...): the same parse, several times faster. ``<ref>`` tags
and HTML comments (a third of the bytes of a modern article) are removed with one regex before
tokenizing; that is safe because MediaWiki itself ends a ``<ref>`` at the next ``</ref>`` and a
comment at the next ``-->``, exactly like the regex. ``''``/``'''`` emphasis is left to a regex too
(``skip_style_tags``), which spares the tokenizer its slowest backtracking.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mwparserfromhell.parser import tokens as T

try:
    from mwparserfromhell.parser import CTokenizer as _Tokenizer
except ImportError:  # a pure-Python install of mwparserfromhell: the same tokens, slower
    from mwparserfromhell.parser.tokenizer import Tokenizer as _Tokenizer

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
_EMPTY_PARENS = re.compile(r"(\s)\((?:\s|[,;:])*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])(?=\s|$)")
_LEADING_SEPARATOR = re.compile(r"\((?:\s*[,;:])+\s*(?=\S)")
_WORD = re.compile(r"[^\W_]")
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


_ROOT, _TEMPLATE, _LINK, _EXTLINK, _HEADING, _TAG, _ENTITY, _SKIP = range(8)


class _Frame:
    """A construct open in the token stream (template, link, tag...), collecting its pieces.

    ``out`` is where text goes now. ``discard`` is true while that text is thrown away (the
    content of a dropped tag, the parameters of a template no rule renders, tag attributes);
    ``dead`` when the whole frame sits inside something thrown away, so nothing of it is rendered.
    """

    __slots__ = ("kind", "out", "first", "rest", "params", "info", "discard", "dead")

    def __init__(self, kind: int, dead: bool, info: object = None) -> None:
        self.kind = kind
        self.first: list[str] = []
        self.out = self.first
        self.rest: list[str] | None = None
        self.params: list[list] | None = None
        self.info = info
        self.dead = dead
        self.discard = dead


class WikitextCleaner:
    """Turns one page's wikitext into ``CleanText``; built once per dump (from its namespaces).

    Not thread-safe (it keeps one tokenizer); build one per thread or process.

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

    __slots__ = ("_dropped_prefixes", "_site_namespaces", "_drop_sections", "_tokenizer")

    def __init__(
        self,
        file_namespaces: Iterable[str] = (),
        site_namespaces: Iterable[str] = (),
        drop_sections: Iterable[str] = DEFAULT_DROP_SECTIONS,
    ) -> None:
        self._dropped_prefixes = _DROPPED_LINK_PREFIXES | {n.strip().lower() for n in file_namespaces if n}
        self._site_namespaces = frozenset(n.strip().lower() for n in site_namespaces if n)
        self._drop_sections = frozenset(_normalize_heading(h) for h in drop_sections)
        self._tokenizer = _Tokenizer()

    def clean(self, wikitext: str) -> CleanText:
        """Cleans one page. Returns empty text when nothing readable is left.

        Raises:
            mwparserfromhell.parser.ParserError: on the (rare) input the tokenizer gives up on.
        """
        tokens = self._tokenizer.tokenize(_PREPASS.sub("", wikitext), 0, True)
        sections = [_Section(0, "", [])]
        root = _Frame(_ROOT, False)
        root.out = sections[0].parts
        stack = [root]
        text_token = T.Text
        for token in tokens:
            kind = type(token)
            if kind is text_token:  # half of all tokens: the fast path
                stack[-1].out.append(token["text"])
                continue
            top = stack[-1]
            if kind is T.TemplateOpen:
                stack.append(_Frame(_TEMPLATE, top.discard))
            elif kind is T.TemplateParamSeparator:
                _template_param(top)
            elif kind is T.TemplateParamEquals:
                if not top.discard and top.params and top.params[-1][0] is None:
                    top.params[-1][0] = "".join(top.out).strip().lower()
                    top.params[-1][1] = top.out = []
            elif kind is T.TemplateClose:
                stack.pop()
                if not top.dead:
                    _template_text(top, stack[-1].out)
            elif kind is T.WikilinkOpen:
                stack.append(_Frame(_LINK, top.discard))
            elif kind is T.WikilinkSeparator:
                top.rest = top.out = []
            elif kind is T.WikilinkClose:
                stack.pop()
                if not top.dead:
                    self._link_text(top, stack[-1].out)
            elif kind is T.TagOpenOpen:
                stack.append(_Frame(_TAG, top.discard, token.get("wiki_markup")))
            elif kind is T.TagAttrStart or kind is T.TagOpenClose:
                if top.rest is None:
                    top.rest = []  # marks "name complete"
                    top.info = (top.info, "".join(top.first).strip().lower())
                top.discard = True
                top.out = []
            elif kind is T.TagCloseOpen:
                if top.rest is None:
                    top.info = (top.info, "".join(top.first).strip().lower())
                top.rest = top.out = []
                top.discard = top.dead or top.info[1] in _DROP_TAGS
            elif kind is T.TagCloseClose or kind is T.TagCloseSelfclose:
                stack.pop()
                if not top.dead:
                    _tag_text(top, stack[-1].out, kind is T.TagCloseSelfclose)
            elif kind is T.HTMLEntityStart:
                stack.append(_Frame(_ENTITY, top.discard, ""))
            elif kind is T.HTMLEntityNumeric:
                top.info = "#"
            elif kind is T.HTMLEntityHex:
                top.info = "#" + token["char"]
            elif kind is T.HTMLEntityEnd:
                stack.pop()
                if not top.dead:
                    stack[-1].out.append(html.unescape(f"&{top.info}{''.join(top.first)};"))
            elif kind is T.HeadingStart:
                stack.append(_Frame(_HEADING, top.discard, token["level"]))
            elif kind is T.HeadingEnd:
                stack.pop()
                if len(stack) == 1:  # a section heading: a new section starts
                    sections.append(_Section(top.info, _tidy_line("".join(top.first)), []))
                    root.out = sections[-1].parts
                elif not top.dead:  # a heading nested in a tag: keep it as a line
                    stack[-1].out.append("\n" + "".join(top.first) + "\n")
            elif kind is T.ExternalLinkOpen:
                stack.append(_Frame(_EXTLINK, top.discard, token.get("brackets")))
            elif kind is T.ExternalLinkSeparator:
                top.rest = top.out = []
            elif kind is T.ExternalLinkClose:
                stack.pop()
                if not top.dead and top.info and top.rest:
                    stack[-1].out.extend(top.rest)
            elif kind is T.CommentStart or kind is T.ArgumentOpen:
                stack.append(_Frame(_SKIP, True))
            elif kind is T.CommentEnd or kind is T.ArgumentClose:
                stack.pop()
            # TagAttrEquals, TagAttrQuote, ArgumentSeparator: nothing to render
        if len(stack) != 1:
            raise ValueError(f"unbalanced token stream: {len(stack) - 1} constructs left open")
        for section in sections:
            section.body = _tidy_block("".join(section.parts))
        return self._assemble(sections)

    def _link_text(self, frame: _Frame, out: list[str]) -> None:
        title = "".join(frame.first).strip()
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
                and frame.rest is None
                and _LANGUAGE_CODE.match(prefix)
                and prefix not in self._site_namespaces
            ):
                return  # interlanguage link
        if frame.rest is not None:
            text = "".join(frame.rest)
            if text.strip():
                out.append(text)
                return
        out.append(display)

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
    """Whitespace and leftovers: runs of spaces collapsed, lines stripped, blank lines between
    paragraphs (at most one), empty ``( )`` and ``(; `` left by removed templates dropped, lines
    without a letter or digit (list markers, lone punctuation) dropped."""
    raw = _RESIDUE.sub("", _MAGIC_WORD.sub("", _EMPHASIS.sub("", raw)))
    raw = _LEADING_SEPARATOR.sub("(", _EMPTY_PARENS.sub(r"\1", raw))
    raw = _SPACE_BEFORE_PUNCT.sub(r"\1", raw)
    paragraphs: list[str] = []
    current: list[str] = []
    for line in raw.split("\n"):
        line = " ".join(line.split())  # runs of any whitespace (tabs, no-break spaces) → one space
        if line and line[0] in ",;:":  # what followed a dropped citation template
            line = line.lstrip(",;: ")
        if line:
            if _WORD.search(line):
                current.append(line)
        elif current:
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


def _template_param(frame: _Frame) -> None:
    """A ``|`` of a template: the first one ends the name, which decides if the rest is kept."""
    if frame.params is None:
        frame.params = []
        frame.info = _normalize_heading("".join(frame.first))
        if not frame.dead and not _renders(frame.info):  # type: ignore[arg-type]
            frame.discard = True
    if frame.discard:
        return
    frame.out = []
    frame.params.append([None, frame.out])


def _renders(name: str) -> bool:
    return name in _INLINE_TEMPLATES or name in _LITERAL_TEMPLATES or name.startswith("lang-")


def _template_text(frame: _Frame, out: list[str]) -> None:
    name = frame.info if frame.params is not None else _normalize_heading("".join(frame.first))
    literal = _LITERAL_TEMPLATES.get(name)  # type: ignore[arg-type]
    if literal is not None:
        out.append(literal)
        return
    rule = _INLINE_TEMPLATES.get(name) or ("first" if name.startswith("lang-") else None)  # type: ignore[union-attr]
    if rule is None or frame.discard:
        return
    args: list[str] = []
    named: dict[str, str] = {}
    for key, parts in frame.params or ():
        value = "".join(parts).strip()
        if key is None:
            args.append(value)
        else:
            named[key] = value
    text = _RULES[rule](args, named, name)  # type: ignore[arg-type]
    if text:
        out.append(text)


def _tag_text(frame: _Frame, out: list[str], self_closing: bool) -> None:
    if isinstance(frame.info, tuple):
        wiki_markup, name = frame.info
    else:  # <br/>: the name was never completed by attributes or contents
        wiki_markup, name = frame.info, "".join(frame.first).strip().lower()
    if self_closing:
        if name == "br":
            out.append("\n")
        elif wiki_markup is not None and name == "dd" and out and not out[-1].endswith("\n"):
            out.append(": ")  # ;term : definition, on one line
        return
    if name in _DROP_TAGS:
        return
    contents = "".join(frame.rest or ())
    if name in _MATH_TAGS:
        out.append(_math_text(contents))
    elif name in _BLOCK_TAGS:
        out.append("\n" + contents + "\n")
    else:
        out.append(contents)


def _first(args: list[str], named: dict[str, str], name: str) -> str:
    return args[0] if args else ""


def _second(args: list[str], named: dict[str, str], name: str) -> str:
    return args[1] if len(args) > 1 else ""


def _last(args: list[str], named: dict[str, str], name: str) -> str:
    return args[-1] if args else ""


def _join(args: list[str], named: dict[str, str], name: str) -> str:
    return ("" if name == "chem" else " ").join(a for a in args if a)


def _frac(args: list[str], named: dict[str, str], name: str) -> str:
    if len(args) >= 3:
        return f"{args[0]} {args[1]}/{args[2]}"
    if len(args) == 2:
        return f"{args[0]}/{args[1]}"
    return f"1/{args[0]}" if args else ""


def _convert(args: list[str], named: dict[str, str], name: str) -> str:
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


def _date(args: list[str], named: dict[str, str], name: str) -> str:
    return _date_text(args, day_first=bool(named.get("df")))


def _as_of(args: list[str], named: dict[str, str], name: str) -> str:
    date = _date_text(args, day_first=False, day=False)
    lead = "as of" if named.get("lc") else "As of"
    return f"{lead} {date}" if date else ""


def _circa(args: list[str], named: dict[str, str], name: str) -> str:
    return f"c. {args[0]}" if args else "c."


def _nihongo(args: list[str], named: dict[str, str], name: str) -> str:
    rest = ", ".join(a for a in args[1:3] if a)
    return f"{args[0]} ({rest})" if args and rest else (args[0] if args else "")


def _angle(args: list[str], named: dict[str, str], name: str) -> str:
    return f"⟨{args[0]}⟩" if args else ""


def _usd(args: list[str], named: dict[str, str], name: str) -> str:
    return f"US${args[0]}" if args else "US$"


_RULES: dict[str, Callable[[list[str], dict[str, str], str], str]] = {
    "first": _first,
    "second": _second,
    "last": _last,
    "join": _join,
    "frac": _frac,
    "convert": _convert,
    "date": _date,
    "as of": _as_of,
    "circa": _circa,
    "nihongo": _nihongo,
    "angle": _angle,
    "usd": _usd,
}


def _date_text(args: list[str], day_first: bool, day: bool = True) -> str:
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
