"""Email notifications for job runs: success, failure, timeout or stop, with the job's attachments.

Mail goes through the SMTP server in the settings (stdlib smtplib, in a thread). Without one,
notifications are skipped and the log says so once per run.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from cml_appliance.projects import files
from cml_appliance.workloads import states

log = logging.getLogger(__name__)
MAX_ATTACHMENTS_BYTES = 10 * 1024 * 1024
LOG_TAIL_BYTES = 4000

# Which recipient flag each final status answers to.
FLAG_FOR_STATUS = {
    states.SUCCEEDED: "notify_on_success",
    states.FAILED: "notify_on_failure",
    states.TIMEDOUT: "notify_on_timeout",
    states.STOPPED: "notify_on_stop",
}
WORD_FOR_STATUS = {states.SUCCEEDED: "succeeded", states.FAILED: "failed", states.TIMEDOUT: "timed out",
                   states.STOPPED: "was stopped"}


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    username: str = ""
    password: str = ""
    starttls: bool = False


def recipients_for(recipients: list[dict[str, Any]], status: str) -> list[str]:
    flag = FLAG_FOR_STATUS.get(status)
    return [r["email"] for r in recipients if flag and r.get(flag) and r.get("email")]


def build_message(
    *, sender: str, to: list[str], job_name: str, project_name: str, status: str, reason: str, run_url: str,
    log_tail: str, project_dir: Path, attachments: list[str],
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = f"[cml-appliance] Job {job_name} {WORD_FOR_STATUS.get(status, status)} ({project_name})"
    lines = [f"Job {job_name} in project {project_name} {WORD_FOR_STATUS.get(status, status)}: {status}."]
    if reason:
        lines.append(f"Why: {reason}")
    lines += [f"Run: {run_url}", "", "Last output:", log_tail or "(none)"]
    skipped = []
    total = 0
    attached: list[tuple[str, bytes]] = []
    for name in attachments:
        try:
            path = files.resolve(project_dir, name)
        except Exception:  # a bad or missing path is reported in the mail, not raised
            skipped.append(name)
            continue
        if not path.is_file() or total + path.stat().st_size > MAX_ATTACHMENTS_BYTES:
            skipped.append(name)
            continue
        data = path.read_bytes()
        total += len(data)
        attached.append((path.name, data))
    if skipped:
        lines += ["", "Not attached (missing, not a file, or over 10 MB in all): " + ", ".join(skipped)]
    message.set_content("\n".join(lines))
    for filename, data in attached:
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        maintype, subtype = kind.split("/", 1)
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


def _send(smtp: SmtpSettings, message: EmailMessage) -> None:
    with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
        if smtp.starttls:
            client.starttls()
        if smtp.username:
            client.login(smtp.username, smtp.password)
        client.send_message(message)


async def send(smtp: SmtpSettings, message: EmailMessage) -> None:
    await asyncio.to_thread(_send, smtp, message)
