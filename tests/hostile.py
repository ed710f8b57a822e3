"""Hypothesis strategies for hostile input, shared by tests/test_properties_*.py: text
a user, a client or a corrupted file may hand us (odd unicode, surrogates where the
text can carry them, huge numbers, signs, unicode digits, NUL bytes, blanks, empty,
very long), mixed into well-formed pieces so that the parsers are reached deep."""
import os

from hypothesis import strategies as st

# Pieces that look like what the parsers expect, or nearly.
NUMBERS = ["0", "1", "80", "8080", "65535", "65536", "-1", "+80", "080", "0x50", "1_0",
           "1e3", "٨٠", "８０", "²", "9" * 20, "9" * 5000, "18446744073709551616",
           "4294967295", " 80", "80 "]
ODD = ["", " ", "\t", "\n", "\r", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85",
       "\u2028", "\u00a0", "\ufeff", "\u202e", "\u0301", "é", "\U0001f600", "\udcff",
       "\ud800", "\\", '"', "'", "%", "%00", "%2F", "#", "x" * 300, "é" * 2000]


def pieces(*extra: str) -> st.SearchStrategy[str]:
    return st.sampled_from(NUMBERS + ODD + list(extra))


def joined(parts: st.SearchStrategy[str], max_size: int = 12) -> st.SearchStrategy[str]:
    return st.lists(parts, max_size=max_size).map("".join)


def any_text(surrogates: bool = True, max_size: int = 60) -> st.SearchStrategy[str]:
    """Any text: every code point, lone surrogates included if asked."""
    chars = st.characters(exclude_categories=() if surrogates else ("Cs",))
    return st.text(chars, max_size=max_size)


def mangled(text: st.SearchStrategy[str], odd: st.SearchStrategy[str] | None = None):
    """`text`, then cut short, or with an odd piece put in somewhere."""
    odd = odd if odd is not None else pieces()

    @st.composite
    def build(draw):
        value = draw(text)
        how = draw(st.sampled_from(["as is", "cut", "insert", "replace"]))
        if how == "as is" or not value:
            return value
        at = draw(st.integers(0, len(value)))
        if how == "cut":
            return value[:at]
        piece = draw(odd)
        end = at if how == "insert" else draw(st.integers(at, len(value)))
        return value[:at] + piece + value[end:]
    return build()


def to_bytes(text: str) -> bytes:
    """`text` as the bytes of a file: surrogates of undecodable bytes back as those
    bytes (surrogateescape), any other lone surrogate as 3 bytes that are not UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def argv_able(text: str) -> bool:
    """Whether `text` can be an argument of a real process: no NUL, and no surrogate
    but those of undecodable bytes."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def argv_text() -> st.SearchStrategy[str]:
    """An argument as Python sees it in sys.argv: any bytes but NUL (execve cannot
    pass one), decoded as the interpreter does (surrogateescape)."""
    raw = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
    return st.one_of(raw.map(os.fsdecode),
                     any_text(surrogates=False).map(lambda t: t.replace("\0", "")))


def garbage_bytes(max_size: int = 200) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=max_size),
                     any_text(surrogates=False, max_size=max_size).map(str.encode))
