"""paddler-agent register's loop, with a stand-in for the agent's answers (the real agent: test_registration)."""

from __future__ import annotations

import threading

import pytest

from agentcheck.register import Next, after_answer, main, run


class Answers:
    """The agent's answers to PUT, one per heartbeat, then DELETE's; stops the loop when they run out."""

    def __init__(self, stop: threading.Event, puts: list[tuple[int, str]], delete: tuple[int, str] = (202, "")) -> None:
        self.stop, self.puts, self.delete = stop, list(puts), delete
        self.sent: list[str] = []

    def send(self) -> tuple[int, str]:
        self.sent.append("PUT")
        answer = self.puts.pop(0)
        if not self.puts:
            self.stop.set()
        return answer

    def withdraw(self) -> tuple[int, str]:
        self.sent.append("DELETE")
        return self.delete


@pytest.mark.parametrize(("status", "next_step"), [
    (201, Next.KEEP), (200, Next.KEEP), (409, Next.KEEP), (0, Next.KEEP), (503, Next.KEEP),
    (400, Next.GIVE_UP), (401, Next.GIVE_UP), (403, Next.GIVE_UP), (404, Next.GIVE_UP), (413, Next.GIVE_UP),
])
def test_what_an_answer_means(status: int, next_step: Next) -> None:
    assert after_answer(status) is next_step


def test_each_change_of_state_is_said_once_and_a_stop_deregisters() -> None:
    stop = threading.Event()
    agent = Answers(stop, [(201, ""), (200, ""), (200, ""), (0, "cannot reach the agent: refused"),
                           (0, "cannot reach the agent: refused"), (201, "")])
    said: list[str] = []
    assert run(agent, 0.0, stop, said.append) == 0  # type: ignore[arg-type]
    assert said == ["registered", "cannot reach the agent: refused", "registered again (the agent had forgotten it)",
                    "deregistered: it leaves once its running requests are over"]
    assert agent.sent == ["PUT"] * 6 + ["DELETE"]


def test_a_refused_token_ends_the_loop_with_status_2_without_deregistering() -> None:
    stop = threading.Event()
    agent = Answers(stop, [(403, "wrong token"), (201, "")])
    said: list[str] = []
    assert run(agent, 0.0, stop, said.append) == 2  # type: ignore[arg-type]
    assert said == ["HTTP 403: wrong token"] and agent.sent == ["PUT"]


@pytest.mark.parametrize(("args", "message"), [
    (["--name", "bad name", "--address", "127.0.0.1:8080"], "is not allowed"),
    (["--name", "gpu7", "--address", "127.0.0.1:99999"], "port must be 1-65535"),
    (["--name", "gpu7", "--address", "127.0.0.1:8080", "--heartbeat", "1ms"], "must be 100ms-1h"),
    (["--name", "gpu7", "--address", "127.0.0.1:8080", "--agent", "https://x:1"], "expected http://HOST:PORT"),
    (["--name", "gpu7", "--address", "127.0.0.1:8080", "--model", "alpha", "--model", "x/y"],
     "'x/y' is not allowed as a model name"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_missing_token_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PADDLER_OPERATOR_TOKEN", raising=False)
    assert main(["--name", "gpu7", "--address", "127.0.0.1:8080"]) == 2
    assert "PADDLER_OPERATOR_TOKEN (the agent's operator token) is not set" in capsys.readouterr().err
