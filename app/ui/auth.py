"""Who may use the workbench: username/password pairs from ``--auth user:pass`` or a users file, and
the rule that a server reachable beyond this machine must have them."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

from core.errors import TarfasError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class AuthConfigError(TarfasError, ValueError):
    """Bad ``--auth`` value or users file, or an unauthenticated server beyond localhost."""


def parse_pair(text: str, where: str = "--auth") -> tuple[str, str]:
    user, sep, password = text.partition(":")
    user = user.strip()
    if not sep or not user or not password:
        raise AuthConfigError(f"{where}: expected 'user:password', got {text!r}")
    return user, password


def read_users_file(path: str | Path) -> list[tuple[str, str]]:
    """``user:password`` per line; blank lines and ``#`` comments are skipped. The file holds
    passwords, so one that others can read is refused."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise AuthConfigError(f"cannot read users file {path}: {exc.strerror or exc}") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthConfigError(f"users file {path} can be read by other users; run: chmod 600 {path}")
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            pairs.append(parse_pair(line, f"{path}:{n}"))
    if not pairs:
        raise AuthConfigError(f"users file {path} holds no 'user:password' lines")
    return pairs


class Users:
    """The accounts the server accepts; :meth:`check` is Gradio's ``auth`` callable."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self._passwords: dict[str, str] = {}
        for user, password in pairs:
            if user in self._passwords:
                raise AuthConfigError(f"user {user!r} is given twice")
            self._passwords[user] = password

    def __bool__(self) -> bool:
        return bool(self._passwords)

    @property
    def names(self) -> list[str]:
        return sorted(self._passwords)

    def check(self, user: str, password: str) -> bool:
        known = self._passwords.get(user)
        # compare_digest on both paths: the time taken does not tell which usernames exist.
        return hmac.compare_digest((known or "\0").encode(), (password or "").encode()) and known is not None


def load_users(auth: list[str] | None = None, users_file: str | Path | None = None) -> Users:
    pairs = [parse_pair(a) for a in auth or []]
    if users_file:
        pairs += read_users_file(users_file)
    return Users(pairs)


def check_exposure(host: str, users: Users) -> None:
    """Refuse to serve beyond localhost without logins: the case store holds evidence."""
    if host not in LOCAL_HOSTS and not users:
        raise AuthConfigError(
            f"refusing to serve on {host} without authentication: anyone on the network could read and change cases. "
            "Give --auth user:password or --users-file FILE, or serve on 127.0.0.1"
        )
