"""A load that grows in steps: add it to locust's ``-f`` after the locustfile.

``--step-users N`` users are added every ``--step-time S`` seconds, at
``--step-rate`` users per second, until ``--step-limit T`` seconds; the CSV
history (``--csv-full-history``) then shows throughput and p99 per step, and
where the knee is. ``scripts/loadtest --step N,S`` sets this up.
"""

from __future__ import annotations

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("step load")
    group.add_argument("--step-users", type=int, default=10, help="users added per step")
    group.add_argument("--step-time", type=float, default=10.0, help="seconds per step")
    group.add_argument("--step-rate", type=float, default=10.0, help="users started per second")
    group.add_argument("--step-limit", type=float, default=60.0, help="seconds the test lasts")


class StepLoadShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options
        run_time = self.get_run_time()
        if run_time >= options.step_limit:
            return None
        step = int(run_time // options.step_time) + 1
        return step * options.step_users, options.step_rate
