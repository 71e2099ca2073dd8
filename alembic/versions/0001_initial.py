"""initial schema: the space, its configuration, blocks and their versions, profiles, events, API keys

Revision ID: 0001
Revises:
Create Date: 2026-11-23 15:29:25.915822
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Migrations are frozen history: they spell types and values out instead of importing server.models.
Timestamp = sa.DateTime(timezone=True)


def _config_table(name: str, *columns: sa.Column[object]) -> None:
    op.create_table(
        name,
        sa.Column("key", sa.String(length=128), nullable=False),
        *columns,
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f(f"pk_{name}")),
    )


def _name() -> sa.Column[str]:
    return sa.Column("name", sa.Text(), server_default="", nullable=False)


def upgrade() -> None:
    op.create_table(
        "space",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("content_version", sa.BigInteger(), nullable=False),
        sa.Column("locales", sa.JSON(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_space_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_space")),
    )
    # Plain SQL, so that `alembic upgrade --sql` can render it too (JSON values have no literal form).
    op.execute(
        "INSERT INTO space (id, content_version, locales, updated_at) "
        """VALUES (1, 0, '{"default": "en-US", "fallbacks": {}}', CURRENT_TIMESTAMP)"""
    )

    _config_table("placements", _name())
    _config_table(
        "segments",
        _name(),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    _config_table("scores")
    _config_table(
        "flags",
        _name(),
        sa.Column("enabled", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    _config_table("experiments", _name())

    op.create_table(
        "blocks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("locale", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column("draft", sa.JSON(), nullable=False),
        sa.Column("draft_revision", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("published_version", sa.Integer(), nullable=True),
        sa.Column("latest_version", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blocks")),
        sa.UniqueConstraint("key", "locale", name=op.f("uq_blocks_key_locale")),
    )
    op.create_table(
        "block_versions",
        sa.Column("block_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("published_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["block_id"],
            ["blocks.id"],
            name=op.f("fk_block_versions_block_id_blocks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("block_id", "version", name=op.f("pk_block_versions")),
    )

    op.create_table(
        "profiles",
        sa.Column("user_id", sa.String(length=256), nullable=False),
        sa.Column("traits", sa.JSON(), nullable=False),
        sa.Column("consent", sa.JSON(), nullable=True),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_profiles")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=256), nullable=False),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=True),
        sa.Column("anonymous_id", sa.String(length=256), nullable=True),
        sa.Column("at", Timestamp, nullable=False),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_user_id_at"), "events", ["user_id", "at"])
    op.create_index(op.f("ix_events_anonymous_id_at"), "events", ["anonymous_id", "at"])

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), server_default="", nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp, nullable=True),
        sa.Column("last_used_at", Timestamp, nullable=True),
        sa.CheckConstraint("scope IN ('delivery', 'preview', 'admin', 'ingest')", name=op.f("ck_api_keys_scope")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("hash", name=op.f("uq_api_keys_hash")),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; children before parents.
    for table in (
        "api_keys",
        "events",
        "profiles",
        "block_versions",
        "blocks",
        "experiments",
        "flags",
        "scores",
        "segments",
        "placements",
        "space",
    ):
        op.drop_table(table)
