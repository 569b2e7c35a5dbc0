"""One APIRouter per resource; handlers stay thin, logic lives in the engine, JobManager and the store."""
