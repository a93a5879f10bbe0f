# tillsync image: `tillsync setup`, `tillsync service <name>`, any other tillsync command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 10001 tillsync && useradd --uid 10001 --gid 10001 --create-home tillsync

WORKDIR /app

# Dependencies first (pinned in pyproject.toml), so a code change does not reinstall them.
COPY pyproject.toml README* ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY shared ./shared
COPY services ./services
COPY till_agent ./till_agent
COPY tillsync ./tillsync
COPY deploy ./deploy

# Editable install on purpose: the code finds deploy/ (migrations, definitions.json) at
# Path(__file__).parent.parent / "deploy", and deploy/ is no Python package. With -e the
# packages are imported from /app, so shared/db.py resolves to /app/deploy/migrations;
# a plain `pip install .` would put them in site-packages, where no deploy/ is.
RUN pip install --no-cache-dir -e .

# Run as a non-root user; the code stays root-owned and read-only. The working directory
# is the user's home, so commands that write relative paths (till-data/, var/demo) work.
USER 10001:10001
WORKDIR /home/tillsync
ENTRYPOINT ["tillsync"]
CMD ["--help"]
