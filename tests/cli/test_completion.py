"""Shell completion (bash run for real on the generated script; zsh parses it) and the man
page (rendered by man), all generated from the parsers: every command and option is in them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
from helpers.cli import cbt
from helpers.system import need

COMMANDS = ["init", "backup", "list", "show", "restore", "mount", "verify", "jobs", "config",
            "run-due", "daemon", "prune", "forget", "stats", "gc", "scan", "diff", "copy", "key",
            "demo", "completion", "man"]


@cache
def _script(shell: str) -> str:
    r = cbt("completion", shell)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def _parsers() -> dict[str, set[str]]:
    """Every command's option strings, straight from its parser (the truth)."""
    from cbt.cli.main import COMMANDS as TABLE
    from cbt.cli.main import command_parser

    return {name: {s for a in command_parser(name)[0]._actions for s in a.option_strings}
            for name in TABLE}


def complete(words: list[str], tmp_path: Path) -> list[str]:
    """What bash offers for the last of ``words`` (the line ``cbt WORDS...<TAB>``), run in
    ``tmp_path``."""
    script = tmp_path / "cbt.bash"
    script.write_text(_script("bash"))
    line = " ".join(["cbt", *words])
    quoted = " ".join(f"'{w}'" for w in ["cbt", *words])
    # set -u: a user's strict shell must not see an unbound variable from the script
    probe = (f"set -u\nsource {script}\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(words)}\n"
             f"COMP_LINE='{line}'\nCOMP_POINT={len(line)}\n_cbt\n"
             "printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", probe], capture_output=True,
                       text=True, cwd=tmp_path, timeout=30, check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_the_parsers_have_the_commands_listed_here() -> None:
    assert sorted(_parsers()) == sorted(COMMANDS)


def test_bash_completes_commands(tmp_path: Path) -> None:
    assert complete(["ba"], tmp_path) == ["backup"]
    assert complete(["d"], tmp_path) == ["daemon", "diff", "demo"]
    shared = ["-r", "--vault", "-q", "--quiet", "-v", "--verbose"]  # also before COMMAND
    assert sorted(complete([""], tmp_path)) == sorted([*COMMANDS, "--help", "--version",
                                                      *shared])


def test_bash_completes_every_option_of_every_command(tmp_path: Path) -> None:
    for name, options in _parsers().items():
        assert set(complete([name, "-"], tmp_path)) == options, name
    assert "--vm" in complete(["backup", "--"], tmp_path)
    assert complete(["backup", "--ful"], tmp_path) == ["--full-scan"]


def test_bash_completes_choices_and_paths(tmp_path: Path) -> None:
    assert complete(["key", ""], tmp_path) == ["list", "add", "remove", "passwd"]
    assert complete(["key", "pa"], tmp_path) == ["passwd"]
    assert complete(["completion", ""], tmp_path) == ["bash", "zsh"]
    assert sorted(complete(["restore", "v", "p", "--format", ""], tmp_path)) == ["qcow2", "raw"]
    (tmp_path / "vault-a").mkdir()
    (tmp_path / "vm.toml").write_text("")
    (tmp_path / "os.img").write_text("")
    # a vault is a directory; a disk, a config a file; a VM name is nothing to complete
    assert complete(["list", "va"], tmp_path) == ["vault-a"]
    assert complete(["list", "v"], tmp_path) == ["vault-a"]
    assert complete(["backup", "--config", "vm"], tmp_path) == ["vm.toml"]
    assert complete(["backup", "vault-a", "--vm", "web", "o"], tmp_path) == ["os.img"]
    assert complete(["backup", "vault-a", "--vm", "v"], tmp_path) == []
    # key's second positional is the vault (a directory), the action before it
    assert complete(["key", "list", "v"], tmp_path) == ["vault-a"]


def test_bash_counts_the_vault_of_r(tmp_path: Path) -> None:
    """Review: after ``-r VAULT`` the next word is the point (or key's id), not a vault:
    directory names were offered there."""
    (tmp_path / "vault-a").mkdir()
    assert complete(["list", "va"], tmp_path) == ["vault-a"]
    assert complete(["show", "-r", "vault-a", "va"], tmp_path) == []
    assert complete(["restore", "--vault=vault-a", "va"], tmp_path) == []
    assert complete(["key", "remove", "-r", "vault-a", "va"], tmp_path) == []
    assert complete(["key", "-r", "vault-a", "re"], tmp_path) == ["remove"]
    assert complete(["mount", "-r", "vault-a", "P", "va"], tmp_path) == ["vault-a"]


def test_bash_after_leading_shared_options(tmp_path: Path) -> None:
    """``cbt -r VAULT <TAB>``: the commands, then the command's own completions."""
    (tmp_path / "vault-a").mkdir()
    assert complete(["-r", "va"], tmp_path) == ["vault-a"]
    assert complete(["-r", "vault-a", "ba"], tmp_path) == ["backup"]
    assert complete(["-q", "--vault=vault-a", "ba"], tmp_path) == ["backup"]
    assert complete(["-r", "vault-a", "key", "re"], tmp_path) == ["remove"]
    assert complete(["-r", "vault-a", "show", "va"], tmp_path) == []
    assert complete(["-r", "vault-a", "list", "--j"], tmp_path) == ["--json"]


def test_zsh_script_defines_every_command_and_option(tmp_path: Path) -> None:
    text = _script("zsh")
    assert text.startswith("#compdef cbt\n") and "_cbt() {" in text
    described = re.findall(r"^        '([a-z-]+):", text, re.M)
    assert described == COMMANDS
    for name, options in _parsers().items():
        body = text.split(f"\n        {name})\n", 1)[1].split("\n            ;;", 1)[0]
        for opt in options:
            assert re.search(rf"[{{',]{re.escape(opt)}[,}}\[]", body), (name, opt)
    assert "'1:ACTION:(list add remove passwd)'" in text
    need(shutil.which("zsh") is not None, "needs zsh (ci/system-deps.sh installs it)")
    script = tmp_path / "_cbt"
    script.write_text(text)
    r = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True, timeout=30,
                       check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_zsh_script_registers_sourced_or_from_fpath(tmp_path: Path) -> None:
    """Review: ``source <(cbt completion zsh)`` after compinit registered nothing (the
    script ran _cbt outside a completion instead of calling compdef); from $fpath too."""
    need(shutil.which("zsh") is not None, "needs zsh (ci/system-deps.sh installs it)")
    (tmp_path / "fp").mkdir()
    script = tmp_path / "fp" / "_cbt"
    script.write_text(_script("zsh"))
    home = {"HOME": str(tmp_path), "ZDOTDIR": str(tmp_path)}
    for setup in (f"autoload -U compinit; compinit -u -D; source {script}",
                  f"fpath=({tmp_path / 'fp'} $fpath); autoload -U compinit; compinit -u -D"):
        r = subprocess.run(["zsh", "-f", "-c", f"{setup}; print -r -- ${{_comps[cbt]}}"],
                           capture_output=True, text=True, timeout=30, check=False,
                           env={**os.environ, **home}, cwd=tmp_path)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert r.stdout.strip() == "_cbt", (setup, r.stdout)


def test_zsh_after_leading_shared_options(tmp_path: Path) -> None:
    """``cbt -r VAULT show <TAB>`` in zsh: _arguments sees the words of ``cbt show -r
    VAULT <TAB>`` (the function run with _describe and _arguments replaced by probes)."""
    need(shutil.which("zsh") is not None, "needs zsh (ci/system-deps.sh installs it)")
    script = tmp_path / "_cbt"
    script.write_text(_script("zsh"))
    probe = (f"compdef() {{ : }}\nsource {script}\n"
             "_describe() { print -r -- \"commands $CURRENT\" }\n"
             "_arguments() { print -r -- \"$CURRENT ${(j:|:)words}\" }\n"
             "t() { words=(\"$@\"); CURRENT=$#; _cbt }\n"
             "t cbt -r v ''\nt cbt -r v show ''\nt cbt show -r v ''\n"
             "t cbt -q --vault=v key remove ''\n")
    r = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True,
                       timeout=30, check=False, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines() == ["commands 2", "4 show|-r|v|", "4 show|-r|v|",
                                     "5 key|-q|--vault=v|remove|"]


def test_zsh_descriptions_keep_quotes_and_colons(tmp_path: Path) -> None:
    """Review: zsh showed "print cbts manual page" and "s3//BUCKET" (quotes and colons
    dropped); as zsh reads the script, they are there."""
    need(shutil.which("zsh") is not None, "needs zsh (ci/system-deps.sh installs it)")
    script = tmp_path / "_cbt"
    script.write_text(_script("zsh"))
    probe = (f"compdef() {{ : }}\nsource {script}\n"
             "_describe() { print -rl -- ${(P)4} }\n"
             "_arguments() { print -rl -- \"$@\" }\n"
             "words=(cbt ''); CURRENT=2; _cbt\nwords=(cbt init ''); CURRENT=3; _cbt\n")
    r = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True,
                       timeout=30, check=False, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert "man:print cbt's manual page" in lines
    assert "--password-file[read the new vault's passphrase from the first line of " \
           "FILE]:FILE:_files" in lines
    assert any(x.startswith("(-r --vault)--vault[directory or s3://BUCKET/PREFIX for the "
                            "new vault") for x in lines), lines


def test_man_page_renders_without_warnings_and_names_everything(tmp_path: Path) -> None:
    r = cbt("man")
    assert r.returncode == 0 and r.stderr == ""
    page = r.stdout
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS",
                    "ENVIRONMENT"):
        assert f"\n.SH {section}\n" in page, section
    for var in ("CBT_VAULT", "CBT_PASSWORD_FILE", "CBT_PASSWORD", "CBT_TO_PASSWORD_FILE"):
        assert var in page
    need(shutil.which("man") is not None, "needs man (man-db; ci/system-deps.sh installs it)")
    (tmp_path / "cbt.1").write_text(page)
    env = {**os.environ, "MANWIDTH": "80", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    shown = subprocess.run(["man", "--warnings", "-l", str(tmp_path / "cbt.1")],
                           capture_output=True, text=True, env=env, timeout=60, check=False)
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    text = re.sub(r".\x08", "", shown.stdout)  # overstrike bold
    for name, options in _parsers().items():
        assert f"cbt {name}" in text, name
        section = text.split(f"\n   cbt {name}\n", 1)[1]
        for opt in options - {"-h", "--help"}:
            assert opt in section, (name, opt)


@pytest.mark.parametrize("shell", ["fish", ""])
def test_an_unknown_shell_is_one_error_line(shell: str) -> None:
    r = cbt("completion", *([shell] if shell else []))
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr


def test_man_page_is_ascii_roff_that_groff_reads_without_preconv() -> None:
    """The page's text beyond ASCII (diff --map's shades) is written as roff escapes:
    groff fed the page directly (no preconv, as some man setups and mandoc-like readers
    do) has no warning, and renders the shades."""
    page = cbt("man").stdout
    assert page.isascii() and "\\[u2591]" in page
    need(shutil.which("groff") is not None, "needs groff (ci/system-deps.sh installs it)")
    r = subprocess.run(["groff", "-man", "-ww", "-Tutf8"], input=page.encode(),
                       capture_output=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    text = re.sub(r".\x08", "", r.stdout.decode())
    assert "'\u2591' '\u2592' '\u2593' '\u2588'" in text
