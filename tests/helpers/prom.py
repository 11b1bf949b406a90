"""Prometheus text exposition format, read back by the tests: a small parser of its own
(HELP and TYPE lines, samples, label values with their escapes), not cbt's code."""

from __future__ import annotations

import re

SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            nxt = text[i + 1]
            out.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_textfile(text: str) -> tuple[Samples, dict[str, str]]:
    """(name, labels) -> value, and name -> TYPE; every sample's family has HELP and TYPE
    lines before it, each once; the text ends with a newline."""
    assert text.endswith("\n")
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helps, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types and kind in ("gauge", "counter"), line
            types[name] = kind
        else:
            m = SAMPLE.fullmatch(line)
            assert m, line
            name, labels, value = m.groups()
            assert name in helps and name in types, line
            pairs = []
            rest = labels or ""
            while rest:
                lm = LABEL.match(rest)
                assert lm, line
                pairs.append((lm.group(1), _unescape(lm.group(2))))
                rest = rest[lm.end():]
            key = (name, frozenset(pairs))
            assert key not in samples, line
            samples[key] = float(value)
    return samples, types


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]
