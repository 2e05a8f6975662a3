# MLflow tracking server for infra/k8s/mlflow: the upstream image plus the PostgreSQL driver
# (backend store) and boto3 (S3-compatible artifact store).
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/your-org/mlflow-server:3.17.2 .
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir "psycopg2-binary>=2.9" "boto3>=1.34"
RUN useradd --uid 10001 --create-home mlflow
USER 10001
