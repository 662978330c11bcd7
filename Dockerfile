# One image for both roles: `meshproxy proxy ...` (DaemonSet) and `meshproxy controller ...`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshproxy ./meshproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 999 --no-create-home meshproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 999
EXPOSE 1081 1082 8080 9000
ENTRYPOINT ["meshproxy"]
CMD ["proxy"]
