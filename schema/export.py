"""Writes the checked-in SDL of both schemas: ``python -m schema.export`` (``make schema``)."""

from __future__ import annotations

from pathlib import Path

from schema import admin, delivery

HERE = Path(__file__).parent
FILES = {HERE / "delivery.graphql": delivery.schema, HERE / "admin.graphql": admin.schema}


def main() -> None:
    for path, schema in FILES.items():
        path.write_text(schema.as_str() + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
