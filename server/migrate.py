"""Bring a database to the latest schema by running the Alembic migrations of this checkout."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command, config

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config(url: str) -> config.Config:
    """The Alembic configuration of this checkout, aimed at `url`, leaving logging alone."""
    alembic_cfg = config.Config(ALEMBIC_INI)
    # Config values go through configparser interpolation: a URL-encoded password has `%`.
    alembic_cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    alembic_cfg.attributes["configure_logger"] = False
    return alembic_cfg


async def upgrade(url: str, revision: str = "head") -> None:
    """Run `alembic upgrade <revision>` against `url`."""
    # env.py runs its own event loop (as it does under the CLI), so it needs a thread of its own.
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def downgrade(url: str, revision: str) -> None:
    """Run `alembic downgrade <revision>` against `url` (`"base"` drops every table)."""
    await asyncio.to_thread(command.downgrade, alembic_config(url), revision)
