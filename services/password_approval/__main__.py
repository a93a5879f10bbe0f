from services.password_approval.main import run

run()
