"""The AWS settings an S3 vault is opened with, and how its errors name what failed.

Credentials are one set: the variables' when a key id or secret is set there,
else the profile's; never a key id from one and a secret or token from the other.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from helpers.s3 import S3Server, fresh_bucket

from cbt.core.errors import CbtIOError, CbtValueError
from cbt.repo.s3 import S3Storage, aws_settings


def _files(tmp_path: Path, creds: str, config: str = "") -> dict[str, str]:
    (tmp_path / "credentials").write_text(creds)
    (tmp_path / "config").write_text(config)
    return {"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "config")}


PROFILE = ("[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n"
           "aws_session_token = FILETOKEN\n")


def test_the_variables_credentials_are_taken_whole(tmp_path: Path) -> None:
    env = {**_files(tmp_path, PROFILE), "AWS_ACCESS_KEY_ID": "ENVKEY",
           "AWS_SECRET_ACCESS_KEY": "ENVSECRET"}
    got = aws_settings(env)
    assert (got["access_key_id"], got["secret_access_key"]) == ("ENVKEY", "ENVSECRET")
    assert "session_token" not in got  # never the profile's token with the variables' key
    got = aws_settings({**env, "AWS_SESSION_TOKEN": "ENVTOKEN"})
    assert got["session_token"] == "ENVTOKEN"


def test_the_profiles_credentials_are_taken_whole(tmp_path: Path) -> None:
    env = {**_files(tmp_path, PROFILE), "AWS_SESSION_TOKEN": "ENVTOKEN"}
    got = aws_settings(env)
    assert (got["access_key_id"], got["secret_access_key"], got["session_token"]) == (
        "FILEKEY", "FILESECRET", "FILETOKEN")


@pytest.mark.parametrize(("extra", "creds", "missing"), [
    ({"AWS_ACCESS_KEY_ID": "ENVKEY"}, PROFILE, "AWS_SECRET_ACCESS_KEY"),
    ({"AWS_SECRET_ACCESS_KEY": "ENVSECRET"}, PROFILE, "AWS_ACCESS_KEY_ID"),
    ({}, "[default]\naws_access_key_id = FILEKEY\n", "aws_secret_access_key"),
])
def test_half_a_set_is_refused(tmp_path: Path, extra: dict[str, str], creds: str,
                               missing: str) -> None:
    with pytest.raises(CbtValueError, match=f"set without {missing}"):
        aws_settings({**_files(tmp_path, creds), **extra})


def test_endpoint_and_region_come_from_either(tmp_path: Path) -> None:
    files = _files(tmp_path, PROFILE, "[default]\nregion = eu-west-1\n"
                                      "endpoint_url = http://127.0.0.1:1\n")
    got = aws_settings(files)
    assert (got["region"], got["endpoint"]) == ("eu-west-1", "http://127.0.0.1:1")
    got = aws_settings({**files, "AWS_REGION": "us-west-2",
                        "AWS_ENDPOINT_URL": "http://127.0.0.1:2"})
    assert (got["region"], got["endpoint"]) == ("us-west-2", "http://127.0.0.1:2")


def test_errors_name_the_prefix_once(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing that fails names s3://bucket/prefix/sub once (it named the prefix twice);
    a missing bucket says so; refused credentials say to check them."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = fresh_bucket()
    S3Storage.create(f"s3://{bucket}/v")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(CbtIOError) as info:
        S3Storage(f"s3://{bucket}/v").list("packs")
    msg = str(info.value)
    assert f"cannot list s3://{bucket}/v/packs:" in msg and "v/v" not in msg, msg
    assert "403" in msg and "check the AWS credentials" in msg and "\n" not in msg, msg
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    gone = f"s3://{fresh_bucket()}/v"
    with pytest.raises(CbtIOError) as info:
        S3Storage(gone).list("")
    assert info.value.errno == errno.ENOENT and "does not exist" in str(info.value)
    assert S3Storage(gone).missing() is not None
    assert S3Storage(f"s3://{bucket}/v").missing() is None


def test_a_settings_file_under_the_home_folder_as_tilde(tmp_path: Path) -> None:
    """AWS_SHARED_CREDENTIALS_FILE=~/x (quoted, so no shell expanded it) is read there,
    as the AWS tools read it (it was taken as a folder named ~: no credentials)."""
    (tmp_path / "creds").write_text(PROFILE)
    (tmp_path / "conf").write_text("[profile other]\nregion = eu-west-3\n"
                                   "[default]\nregion = eu-north-1\n")
    got = aws_settings({"HOME": str(tmp_path), "AWS_SHARED_CREDENTIALS_FILE": "~/creds",
                        "AWS_CONFIG_FILE": "~/conf"})
    assert (got["access_key_id"], got["region"]) == ("FILEKEY", "eu-north-1"), got
