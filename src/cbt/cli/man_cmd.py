"""Print cbt's manual page (roff), made from the same parsers as --help.

  cbt man | man -l -                      read it now
  cbt man > ~/.local/share/man/man1/cbt.1  install it for 'man cbt'

Sections: NAME, SYNOPSIS, DESCRIPTION, COMMANDS (each command's --help text and
its options), EXIT STATUS, ENVIRONMENT, SEE ALSO.  The text is the commands'
own (their module docstrings and option helps), so it says what --help says.
"""

from __future__ import annotations

import argparse
import datetime as _dt

from cbt.cli._common import EXIT_OK

# (variable, what it does); every one cbt reads
ENVIRONMENT = [
    ("CBT_VAULT", "the vault of a command that takes one, when neither VAULT nor -r VAULT "
                  "is given; cbt diff's ::POINT (not cbt copy's: it names SRC and DST)"),
    ("CBT_PASSWORD_FILE", "a file whose first line is the passphrase of an encrypted vault"),
    ("CBT_PASSWORD", "the passphrase of an encrypted vault itself (CBT_PASSWORD_FILE wins)"),
    ("CBT_TO_PASSWORD_FILE", "cbt copy: the file holding the destination vault's passphrase"),
    ("CBT_TO_PASSWORD", "cbt copy: the destination vault's passphrase itself"),
    ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN",
     "the credentials of an s3://BUCKET/PREFIX vault"),
    ("AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE",
     "where else those credentials are read from (a profile of the AWS settings files)"),
    ("AWS_REGION, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL",
     "the region and endpoint of an s3:// vault (an S3-compatible server)"),
    ("STATE_DIRECTORY, XDG_STATE_HOME",
     "where cbt daemon records its maintenance slot and cbt verify the window its last "
     "--read-data-subset N% run read (systemd's $STATE_DIRECTORY, else $XDG_STATE_HOME/cbt, "
     "else ~/.local/state/cbt)"),
    ("CBT_LOCK_LEASE", "seconds a lock on an s3:// vault lives without renewal (default 300)"),
    ("CBT_POINT", "set by cbt for a job's hooks: the id of the point being made"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print(man_page(), end="")
    return EXIT_OK


def roff(text: str) -> str:
    """Text as roff source: backslashes escaped, a line starting with . or ' made safe, a
    break allowed after each comma (a JSON shape is one long word), every character
    beyond ASCII as its named escape (``\\[u2591]``: groff without preconv, or a page
    installed where man does not run preconv, read UTF-8 bytes as Latin-1 garbage)."""
    out = []
    text = "".join(c if c.isascii() else f"\\[u{ord(c):04X}]" for c in
                   text.replace("\\", "\\e"))
    for line in text.replace("-", "\\-").replace(",", ",\\:").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _paragraphs(text: str) -> list[str]:
    """A docstring's paragraphs; an indented block (an example) kept as it is, in .nf."""
    import textwrap

    out = []
    for block in textwrap.dedent(text).strip().split("\n\n"):
        if any(line.startswith(" ") for line in block.splitlines()):
            out.append(f".PP\n.nf\n{roff(block)}\n.fi")
        else:
            out.append(f".PP\n{roff(' '.join(block.split()))}")
    return out


def man_page() -> str:
    """The whole page (see the module's docstring for its sections)."""
    from cbt import __version__
    from cbt.cli.completion_cmd import commands
    from cbt.cli.main import build_parser

    top = build_parser()
    specs = commands()
    date = _dt.date.today().isoformat()
    out = [f'.TH CBT 1 "{date}" "cbt {__version__}" "User Commands"',
           ".ad l", ".nh",  # ragged right, no hyphens: paths and options stay whole
           ".SH NAME", "cbt \\- " + roff(top.description or "").rstrip("."),
           ".SH SYNOPSIS", ".B cbt", ".I COMMAND", "[\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
           ".br", ".B cbt", "\\-\\-help | \\-\\-version",
           ".SH DESCRIPTION",
           ".PP", roff("cbt backs up the disks of virtual machines into a vault: a directory "
                       "or an S3 prefix of content-addressed, deduplicated, optionally "
                       "encrypted blocks. Each backup is a recovery point; a disk's first is "
                       "full, every later one stores only the blocks the vault does not "
                       "hold yet. Every command takes -q/--quiet (say only what was asked "
                       "for) and -v/--verbose (say more), and --help."),
           ".SH COMMANDS"]
    for c in specs:
        out += [f".SS {roff('cbt ' + c.name)}", f".B {roff(c.summary)}", ".PP", ".nf",
                roff(c.usage), ".fi", *_paragraphs(c.description)]
        for arg in c.positionals + c.options:
            if "-h" in arg.flags:
                continue
            names = ", ".join(f"\\fB{roff(f)}\\fR" for f in arg.flags) or f"\\fI{arg.metavar}\\fR"
            value = (f" \\fI{roff(arg.metavar)}\\fR" if arg.flags and arg.takes_value else "")
            choices = f" (one of: {', '.join(arg.choices)})" if arg.choices else ""
            out += [".TP", names + value, roff(" ".join(arg.help.split()) + choices)]
    out += [".SH EXIT STATUS", ".TP", "0", "success",
            ".TP", "1", "differences found (cbt diff)",
            ".TP", "2", "an error (one line on stderr: what and where)",
            ".TP", "141", "stdout closed by its reader (cbt list | head)",
            ".SH ENVIRONMENT"]
    for name, what in ENVIRONMENT:
        out += [".TP", f"\\fB{roff(name)}\\fR", roff(what)]
    out += [".SH SEE ALSO", "\\fBqemu\\-img\\fR(1), \\fBqemu\\-nbd\\fR(8)", ""]
    return "\n".join(out)
