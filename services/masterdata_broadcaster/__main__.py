from services.masterdata_broadcaster.main import run

run()
