# Worker image for Dataflow (and any portable Beam runner): the Beam SDK harness, CUDA PyTorch
# and this project, so workers never install anything at start-up.
#   docker build -t REGION-docker.pkg.dev/PROJECT/rs/worker:0.1 . && docker push ...
# The project goes in as a wheel, built here the way tests/test_wheel.py builds the one it
# installs into a fresh environment and runs: what the workers import is what was tested.
FROM apache/beam_python3.11_sdk:2.77.0 AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rs_pseudolabel ./rs_pseudolabel
COPY pipeline ./pipeline
COPY teachers ./teachers
COPY students ./students
COPY data ./data
COPY configs ./configs
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM apache/beam_python3.11_sdk:2.77.0
COPY --from=wheel /wheels /wheels
# torch==2.14.1 from PyPI is the CUDA build: the same image serves CPU and GPU workers.
RUN pip install --no-cache-dir "$(ls /wheels/rs_pseudolabel-*.whl)[gcp]" && rm -rf /wheels

# The Beam SDK harness stays the entry point.
ENTRYPOINT ["/opt/apache/beam/boot"]
