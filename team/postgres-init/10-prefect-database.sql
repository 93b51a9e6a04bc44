-- Docker Compose (team/compose.yaml): the official postgres image runs this once, on an empty
-- volume, after creating the user onnxship and the database mlflow.
CREATE DATABASE prefect OWNER onnxship;
