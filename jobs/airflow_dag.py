"""An Airflow DAG that runs jobs/s3.yaml once a day for that day's partition.

`batchllm submit` waits until the job is done and exits 0 (complete), 1 (failed: too many bad rows or a
crash), 2 (a spec error: fix the job, don't retry) or 75 (stopped early, e.g. a preempted machine: retry;
it resumes from its checkpoints). Retries are safe: a finished day is left alone and says so.
Copy this file into your DAGs folder and point BATCHLLM_JOB at the job file.
"""
import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

JOB = os.environ.get("BATCHLLM_JOB", "/opt/batchllm/jobs/s3.yaml")

with DAG(
    dag_id="review_sentiment_nightly",
    start_date=datetime(2024, 6, 1),
    schedule="@daily",
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 3, "retry_delay": timedelta(minutes=5)},
    tags=["batchllm"],
) as dag:
    BashOperator(
        task_id="label_reviews",
        bash_command=(
            f"batchllm submit {JOB} --no-progress "
            "--set input.uri=s3://my-bucket/reviews/{{ ds }}/ "
            "--set output.uri=s3://my-bucket/labels/{{ ds }}/ "
            "--set name=review-sentiment-{{ ds_nodash }}"
        ),
        # Any non-zero exit fails the try and Airflow retries; a retry after 75 resumes, after 1 or 2 it
        # fails again quickly (a finished job is not rerun; a spec error is found before any work).
        execution_timeout=timedelta(hours=6),
    )
