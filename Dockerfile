# Worker image for Dataflow (and any portable Beam runner): the Beam SDK harness, CUDA
# PyTorch and this project, so workers never install anything at start-up.
#   docker build -t REGION-docker.pkg.dev/PROJECT/rs/worker:0.1 . && docker push ...
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/rs-pseudolabel
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY teachers ./teachers
COPY students ./students
COPY data ./data
COPY configs ./configs
# torch==2.14.1 from PyPI is the CUDA build: the same image serves CPU and GPU workers.
RUN pip install --no-cache-dir '.[gcp]'

# The Beam SDK harness stays the entry point.
ENTRYPOINT ["/opt/apache/beam/boot"]
