# The Airflow image: the official one plus airflow-ray (a wheel built in a checkout: uv build).
# Its Python minor version must be the Ray cluster image's (docs/deploy/ray.Dockerfile).
# [START airflow_image]
FROM apache/airflow:3.3.2-python3.12
COPY dist/ /tmp/dist/
# Pin Airflow so pip does not move it; the s3 extra reads and writes checkpoints on S3.
RUN pip install --no-cache-dir "apache-airflow==3.3.2" "$(ls /tmp/dist/airflow_ray-*.whl)[s3]"
# [END airflow_image]
