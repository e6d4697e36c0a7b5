"""Track the books lent out by a small neighbourhood library.

The module keeps an in-memory catalogue of titles and members, records loans and
returns, and computes late fees. It is deliberately free of third-party
dependencies so that it can run on the volunteer desk's old laptop.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

DAILY_FEE_CENTS = 15
MAX_FEE_CENTS = 500
LOAN_DAYS = 21


class LibraryError(Exception):
    """Raised when a request cannot be honoured (unknown book, no copies left...)."""


@dataclass
class Book:
    """One title in the catalogue, with the number of physical copies we own."""

    isbn: str
    title: str
    author: str
    copies: int = 1
    on_loan: int = 0

    @property
    def available(self) -> int:
        """Copies currently on the shelf."""
        return self.copies - self.on_loan

    def describe(self) -> str:
        plural = "copy" if self.available == 1 else "copies"
        return f"{self.title} by {self.author} ({self.available} {plural} available)"


@dataclass
class Loan:
    """A book handed to a member on a given day."""

    isbn: str
    member_id: int
    start: dt.date
    returned: dt.date | None = None

    @property
    def due(self) -> dt.date:
        return self.start + dt.timedelta(days=LOAN_DAYS)

    def days_late(self, today: dt.date) -> int:
        """Whole days past the due date, counted up to the return (or today)."""
        end = self.returned or today
        return max(0, (end - self.due).days)

    def fee_cents(self, today: dt.date) -> int:
        return min(MAX_FEE_CENTS, self.days_late(today) * DAILY_FEE_CENTS)


@dataclass
class Member:
    member_id: int
    name: str
    email: str = ""
    loans: list[Loan] = field(default_factory=list)

    def open_loans(self) -> list[Loan]:
        return [loan for loan in self.loans if loan.returned is None]


class Library:
    """The catalogue, the members and every loan ever made.

    >>> lib = Library()
    >>> lib.add_book(Book("978-0", "Small Gods", "T. Pratchett", copies=2))
    >>> alice = lib.join("Alice")
    >>> loan = lib.lend("978-0", alice.member_id, dt.date(2024, 3, 1))
    >>> lib.books["978-0"].available
    1
    """

    def __init__(self) -> None:
        self.books: dict[str, Book] = {}
        self.members: dict[int, Member] = {}
        self._next_id = 1

    # -- catalogue -------------------------------------------------------------

    def add_book(self, book: Book) -> None:
        existing = self.books.get(book.isbn)
        if existing is None:
            self.books[book.isbn] = book
        else:
            # A second donation of the same title just adds copies.
            existing.copies += book.copies

    # -- members and loans -----------------------------------------------------

    def join(self, name: str, email: str = "") -> Member:
        member = Member(self._next_id, name, email)
        self.members[member.member_id] = member
        self._next_id += 1
        return member

    def _book(self, isbn: str) -> Book:
        try:
            return self.books[isbn]
        except KeyError:
            raise LibraryError(f"no book with ISBN {isbn!r}") from None

    def lend(self, isbn: str, member_id: int, today: dt.date) -> Loan:
        book = self._book(isbn)
        member = self.members.get(member_id)
        if member is None:
            raise LibraryError(f"unknown member {member_id}")
        if book.available <= 0:
            raise LibraryError(f"all copies of {book.title!r} are out")
        if any(loan.fee_cents(today) > 0 for loan in member.open_loans()):
            raise LibraryError(f"{member.name} has overdue books; return them first")
        loan = Loan(isbn, member_id, today)
        member.loans.append(loan)
        book.on_loan += 1
        return loan

    def give_back(self, isbn: str, member_id: int, today: dt.date) -> int:
        """Closes the member's open loan of `isbn` and returns the fee owed, in cents."""
        member = self.members[member_id]
        for loan in member.open_loans():
            if loan.isbn == isbn:
                loan.returned = today
                self._book(isbn).on_loan -= 1
                return loan.fee_cents(today)
        raise LibraryError(f"{member.name} has no open loan of {isbn}")

    # -- persistence -------------------------------------------------------------

    def save(self, path: Path) -> None:
        data = {
            "books": [vars(b) for b in self.books.values()],
            "members": [
                {
                    "member_id": m.member_id,
                    "name": m.name,
                    "email": m.email,
                    "loans": [
                        {
                            "isbn": loan.isbn,
                            "start": loan.start.isoformat(),
                            "returned": loan.returned and loan.returned.isoformat(),
                        }
                        for loan in m.loans
                    ],
                }
                for m in self.members.values()
            ],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        tmp.replace(path)  # atomic on POSIX: a crash never leaves half a file


def format_cents(cents: int) -> str:
    """Formats an amount of money for the receipt printer: 135 -> '$1.35'."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${cents // 100}.{cents % 100:02d}"


if __name__ == "__main__":
    import sys

    library = Library()
    library.add_book(Book("978-1", "The Dispossessed", "U. K. Le Guin", copies=2))
    reader = library.join("Sam", "sam@example.org")
    library.lend("978-1", reader.member_id, dt.date(2024, 1, 2))
    owed = library.give_back("978-1", reader.member_id, dt.date(2024, 2, 1))
    print(f"{reader.name} owes {format_cents(owed)}")
    library.save(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("library.json"))
