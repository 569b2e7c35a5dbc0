"""Shared request dependencies."""

from __future__ import annotations

from fastapi import Request

from mixer_service.service.jobs import JobManager


async def jobs(request: Request) -> JobManager:
    return request.app.state.jobs
