"""The baseline for bench_votes.py: a bare Flask endpoint that parses a JSON vote and
answers JSON, with no database — served by the same gunicorn settings."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/vote")
def vote():
    body = request.get_json()
    return jsonify(vote={"trial_token": body["trial_token"], "choice": body["choice"]})
