from services.receipt_router.main import run

run()
