FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY content ./content
COPY schema ./schema
COPY server ./server
COPY alembic ./alembic
# Editable, so that `tessera migrate` finds alembic.ini and alembic/ in /app.
RUN pip install --no-cache-dir -e .
EXPOSE 8000
# Migrates, then serves. Create keys with `docker compose exec tessera tessera keys create --scope delivery`.
CMD ["tessera", "serve"]
