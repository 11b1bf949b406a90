"""Create a vault in a new or empty directory, or at a new or empty s3://BUCKET/PREFIX.

An S3 location's bucket is made when missing (when the credentials allow it);
where the server is and who cbt is come from the standard AWS settings
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL,
AWS_REGION, AWS_PROFILE and ~/.aws).

A new vault is encrypted unless --encryption none: every block and record is
sealed with an AEAD under a random master key, and block ids are keyed BLAKE3.
The master key is stored only wrapped by the passphrase (scrypt); lose every
passphrase and the vault is lost.  The passphrase comes from --password-file
FILE, CBT_PASSWORD_FILE, CBT_PASSWORD, or a prompt (asked twice) on a
terminal.  --encryption none makes a vault whose blocks are compressed but
unencrypted, named by their plain BLAKE3.

--compression is the codec every backup into the vault compresses new blocks
with, for good: zstd (level 1, the default) stores least; lz4 takes about 45%
less CPU to compress and 55% less to decompress, for about 45% more stored on
file-system and database content (what borg stores with its default lz4).
Restores and backups that are bound by the CPU, not the disk or the network,
are faster with lz4.  A vault is format 3, or 4 with lz4 (a cbt older than lz4
refuses it).  `cbt copy` stores blocks with the destination's codec.

--json prints {"vault","format_version","encryption","compression","id_key","key",
"warnings"} ("key": the id of the first key slot, null when unencrypted).
"""

from __future__ import annotations

import argparse

from cbt.cli._common import EXIT_OK, PassphraseFinder, add_json, add_vault, print_json, say

KDF_LOG_N_MIN, KDF_LOG_N_MAX = 10, 20  # 20: 1 GiB, the most a key slot may ask


def kdf_log_n_arg(text: str) -> int:
    """argparse type of ``--kdf-log-n``: an integer in 10..20."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not KDF_LOG_N_MIN <= value <= KDF_LOG_N_MAX:
        raise argparse.ArgumentTypeError(f"not a scrypt cost in {KDF_LOG_N_MIN}..{KDF_LOG_N_MAX}: "
                                         f"{text!r}")
    return value


def add_kdf_log_n(p: argparse.ArgumentParser) -> None:
    from cbt.core.crypto import KdfParams

    p.add_argument("--kdf-log-n", type=kdf_log_n_arg, default=KdfParams().log_n, metavar="N",
                   help="scrypt cost of the passphrase's key slot: 2^N iterations and "
                        "2^N x 1 KiB of memory (default 17: 128 MiB, about half a second "
                        "to open the vault; 10..20). Higher makes guessing a passphrase "
                        "dearer and every opening slower")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cbt.core.crypto import ALGORITHMS
    from cbt.repo.vault import COMPRESSIONS

    add_vault(p, "directory or s3://BUCKET/PREFIX for the new vault")
    p.add_argument("--encryption", choices=["none", *ALGORITHMS], default=ALGORITHMS[0],
                   help=f"the AEAD sealing blocks and records (default {ALGORITHMS[0]}, the "
                        "faster here); none: an unencrypted vault, no passphrase")
    p.add_argument("--compression", choices=list(COMPRESSIONS), default="zstd",
                   help="the codec of the vault's blocks: zstd (default, stores least) or "
                        "lz4 (faster to write and read, stores more)")
    add_kdf_log_n(p)
    p.add_argument("--password-file", metavar="FILE",
                   help="read the new vault's passphrase from the first line of FILE (else "
                        "CBT_PASSWORD_FILE, CBT_PASSWORD, or a prompt on a terminal, "
                        "asked twice)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    from cbt.api import Vault
    from cbt.core.crypto import KdfParams

    what = f"the new vault {args.vault} is to be encrypted ({args.encryption})"
    find = PassphraseFinder(args.vault, args.password_file, confirm=True, what=what,
                            hint="; or make an unencrypted vault with --encryption none")
    v = Vault.init(args.vault, encryption=args.encryption, passphrase=find,
                   kdf=KdfParams(log_n=args.kdf_log_n), compression=args.compression)
    key = v.key_slots()[0].id if v.encrypted else None
    if args.json:
        print_json({"vault": v.root, "format_version": v.config["format_version"],
                    "encryption": v.config["encryption"],
                    "compression": v.config["compression"], "id_key": v.config["id_key"],
                    "key": key, "warnings": []})
    elif key is None:
        say(f"initialised cbt vault (format {v.config['format_version']}, unencrypted, "
            f"{v.config['compression']}) in {v.root}")
    else:
        say(f"initialised cbt vault (format {v.config['format_version']}, encrypted with "
            f"{v.config['encryption']}, {v.config['compression']}, key {key}) in {v.root}")
        say("  keep the passphrase safe: without it the vault cannot be read")
    return EXIT_OK
