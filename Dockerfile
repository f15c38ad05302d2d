# openai-forward on Twisted. The install steps match .ci/run, which builds the same venv on every change.
FROM python:3.12-slim

COPY . /src
RUN python -m venv /opt/fwd \
 && /opt/fwd/bin/python -m pip install --no-cache-dir --upgrade pip \
 && /opt/fwd/bin/python -m pip install --no-cache-dir /src \
 && /opt/fwd/bin/twistd --help | grep openai-forward > /dev/null \
 && useradd --create-home --uid 10001 fwd \
 && install -d -o fwd -g fwd /home/fwd/Log /home/fwd/Data \
 && rm -rf /src

ENV PATH=/opt/fwd/bin:$PATH PYTHONUNBUFFERED=1
USER fwd
WORKDIR /home/fwd
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["twistd", "-n", "--pidfile=", "openai-forward", "--port", "tcp:8000"]
