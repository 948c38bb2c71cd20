# The Ray cluster image: Ray and the data libraries airflow-ray's Ray-side code uses; neither Airflow
# nor airflow-ray (it ships its Ray-side code by value). Same Ray release and Python minor version as
# the Airflow image (docs/deploy/airflow.Dockerfile).
# [START ray_image]
FROM rayproject/ray:2.60.0-py312
# s3fs: checkpoints on S3 are written and restored by Ray tasks. Add what your @ray_task code imports.
RUN pip install --no-cache-dir numpy pandas pyarrow fsspec xxhash s3fs
# [END ray_image]
