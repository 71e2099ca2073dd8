"""Tessera's GraphQL layer: the delivery and admin schemas, their types, context and ports."""
