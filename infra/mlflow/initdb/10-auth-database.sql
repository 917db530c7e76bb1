-- Runs once, when the postgres container initialises an empty data folder (as POSTGRES_USER, who owns
-- the new database). The tracking data lives in POSTGRES_DB (mlflow); users and permissions of the
-- basic-auth app in their own database.
CREATE DATABASE mlflow_auth;
