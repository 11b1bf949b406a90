"""The vault: content-addressed packs, an index, manifests and recovery points."""

from cbt.vault.vault import NotAVaultError, Vault, VaultVersionError

__all__ = ["NotAVaultError", "Vault", "VaultVersionError"]
