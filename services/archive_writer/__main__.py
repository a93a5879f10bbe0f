from services.archive_writer.main import run

run()
