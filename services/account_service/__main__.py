from services.account_service.main import run

run()
