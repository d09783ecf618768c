"""Logins of the workbench: --auth pairs and users files, and no unauthenticated serving beyond localhost."""

from __future__ import annotations

import pytest

from app.ui.auth import AuthConfigError, Users, check_exposure, load_users, read_users_file


def test_auth_pairs_and_a_users_file_make_the_accounts(tmp_path):
    f = tmp_path / "users"
    f.write_text("# analysts\nrita:s3cret:with:colons\n\n")
    f.chmod(0o600)
    users = load_users(["ana:pw"], f)
    assert users.names == ["ana", "rita"]
    assert users.check("ana", "pw") and users.check("rita", "s3cret:with:colons")
    assert not users.check("ana", "PW") and not users.check("nobody", "pw") and not users.check("ana", "")


@pytest.mark.parametrize("bad", ["ana", "ana:", ":pw", ""])
def test_a_malformed_auth_value_is_refused_with_the_expected_form(bad):
    with pytest.raises(AuthConfigError, match="user:password"):
        load_users([bad])


def test_a_users_file_others_can_read_is_refused(tmp_path):
    f = tmp_path / "users"
    f.write_text("ana:pw\n")
    f.chmod(0o644)
    with pytest.raises(AuthConfigError, match="chmod 600"):
        read_users_file(f)
    with pytest.raises(AuthConfigError, match="cannot read"):
        read_users_file(tmp_path / "missing")


def test_the_same_user_twice_is_refused():
    with pytest.raises(AuthConfigError, match="twice"):
        Users([("ana", "a"), ("ana", "b")])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_localhost_may_serve_without_logins(host):
    check_exposure(host, Users([]))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_any_other_address_needs_logins(host):
    with pytest.raises(AuthConfigError, match="without authentication"):
        check_exposure(host, Users([]))
    check_exposure(host, Users([("ana", "pw")]))
