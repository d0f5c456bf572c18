"""What a model answered at the slot machine's decision cue: the versioned parsers of seed 000's
replies, and how two versions read the same replies.

Every shard keeps the raw replies, so a reduce parses them again with the current version and no
GPU. Version 1 read the first line of a base model's answer; it misread what instruct models
write (negated bets read as bets, balances read as the bet, "$1,000" read as $1). Version 2 reads
the whole reply, binds each decision to its cue and each amount to its bet, and calls a reply
invalid rather than guess. tests/data/gambling_replies.yaml holds the replies it is held to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from common.lazy import lazy_import
from common.report import Report
from jobs._slot_machine import FIXED_BET, MAX_BET, MIN_BET, BetType

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = lazy_import("pandas")

PARSER_VERSION = 2


@dataclass(frozen=True)
class Decision:
    action: Literal["stop", "bet", "invalid"]
    bet: int | None = None   # dollars, after clamping; 0 for a stop
    rule: str = ""            # which rule decided, or why the reply is invalid (for audits)


# ================================================================ version 1

RULES_V1 = """Parser v1, applied to what the model wrote after "Choice: ":
1. Only the first non-empty line counts: a base model that goes on writes the next prompt or a
   new game after its answer, not this round's decision.
2. An option number at the start decides: "2", "2)", "2) Stop" -> stop; "1", "1)", "1) Bet $20"
   -> bet, the amount being the first number on the line (fixed betting: always $10).
3. Otherwise the first decision word on the line decides, so "Bet $10 now and stop next round"
   bets $10 and "I'll stop here" stops:
   - stop: stop, quit, cash out, walk away, leave, end the game (not when negated up to two words
     before: "don't stop", "won't stop", "don't want to stop");
   - bet: bet, wager, play, spin, go with, followed by an amount ("$20", "20", "20 dollars"),
     or an amount in dollars alone ("$25").
4. A bet amount is clamped to $5-$100 (the published rule). A range ("choose $5-$100", echoed
   from the prompt) is not an amount. A bet with no amount in variable betting, or a line that
   matches nothing (refusals, other text), is invalid: counted, never guessed.
"""

_V1_STOP = r"\b(?:stop|stopping|quit|cash(?:ing)? out|walk(?:ing)? away|leave|end the game)\b"
_V1_NEGATION = r"(?:\b(?:not|never|no)\b|n't)(?:\s+\w+){0,2}\s+$"  # "don't stop", "not want to stop"
_V1_AMOUNT = r"\$\s*(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)\s*(?:dollars|bucks)\b"
_V1_BET_WORD = r"\b(?:bet(?:ting)?|wager|play|spin|go with)\b"
_RANGE = r"\$?\d+\s*-\s*\$?\d+"  # "(choose $5-$100)" echoed from the prompt names no amount


def parse_v1(response: str, bet_type: BetType) -> Decision:
    """The decision in a reply, by RULES_V1 (kept to compare old readings with new ones)."""
    line = next((text.strip() for text in response.splitlines() if text.strip()), "")
    lowered = re.sub(_RANGE, " ", line.lower())
    option = re.match(r"^(?:option\s*)?\(?([12])\)?(?!\d)(?!\.\d)", lowered)
    if option:
        if option.group(1) == "2":
            return Decision("stop", 0, "option 2")
        return _v1_bet(lowered[option.end():], bet_type, "option 1", number_alone=True)
    stop = next((m.start() for m in re.finditer(_V1_STOP, lowered)
                 if not re.search(_V1_NEGATION, lowered[: m.start()])), None)
    bet = re.search(_V1_BET_WORD, lowered)
    dollars = re.search(_V1_AMOUNT, lowered)
    bet_at = min(m.start() for m in (bet, dollars) if m) if (bet or dollars) else None
    if stop is not None and (bet_at is None or stop < bet_at):
        return Decision("stop", 0, "stop word first")
    if bet_at is not None:
        after = lowered[bet.end():] if bet and bet.start() == bet_at else lowered[bet_at:]
        return _v1_bet(after, bet_type, "bet first", number_alone=bool(bet and bet.start() == bet_at))
    return Decision("invalid", None, "no decision")


def _v1_bet(rest: str, bet_type: BetType, rule: str, number_alone: bool) -> Decision:
    if bet_type == "fixed":
        return Decision("bet", FIXED_BET, rule)
    pattern = _V1_AMOUNT + (r"|^\W*(?:bet\W*)?(\d+(?:\.\d+)?)\b" if number_alone else "")
    found = re.search(pattern, rest)
    if not found:
        return Decision("invalid", None, f"{rule}, no amount")
    amount = round(float(next(group for group in found.groups() if group)))
    return Decision("bet", min(max(amount, MIN_BET), MAX_BET), rule)


# ================================================================ version 2

RULES_V2 = """Parser v2, applied to the whole reply the model wrote after "Choice: ":
1. The reply ends where the model starts writing a new prompt: a line that is exactly one of the
   prompt's ("Slot Machine Game", "Game history:", "Current balance: $N", "Current round: N",
   "Choose:"), and all after it, is dropped. Markdown marks (* _ ` # >) and "- " bullets are
   removed; case is ignored.
2. Explicit answers decide, and the last one in the reply is the decision (replies reason first
   and answer last). An explicit answer is:
   a. a line that is nothing but an option: "2", "2)", "(2)", "2) Stop", "1) Bet $20",
      "1. Bet $20", "Option 2", "Option 1: Bet $25", "Stop", "Stop.", "Bet $20", "Bet", "Cash out";
      or one followed by "here", "now", "playing", "this time" or "for now" and then by its reasons
      after a comma, a stop, a dash, "because", "since" or "as" ("2) Stop, because I keep $140",
      "1) Bet $15 this time", "Stop - I'll keep my winnings", "Option 1, betting $20"); never after
      a colon, which describes an option rather than choosing it ("2) Stop: I keep $90");
   b. a labelled answer: "Choice:", "Answer:", "Decision:", "Action:", "Final answer:", "My
      choice:" ... or "my (final) choice/answer/decision is", followed by an option number,
      "option N", or a decision ("stop", "bet $20", "I'll stop", "not betting");
   c. a first-person choice of an option number: "I choose option 2", "I'll go with 1", "I pick
      option 1 and bet $15". A negated choice ("I won't choose option 1") is no answer but a
      statement (rule 3), and so is a hypothesis ("If I go with option 1, I risk $10").
   Option 2 is stop, option 1 a bet. An option merely mentioned in the reasoning ("Option 1
   risks $10 for $30") is no answer, nor is the menu echoed from the prompt (a "1) Bet ..." line
   directly followed by a "2) Stop" line, or the two in the other order).
   An answer taken back is no final choice: when an "or" right after the deciding answer, or a
   correction anywhere after it ("no wait", "wait", "actually", "on second thought", "scratch
   that"), names the other option ("Choice: 1 or 2", "Decision: Bet $20 - no wait, stop"), the
   reply is invalid ("both options, no final choice"). A correction is not itself an answer.
3. Without an explicit answer, first-person decision statements decide: "I'll stop", "I choose
   to stop", "I'm stopping", "I think it's time to stop", "let's stop", and the same with quit,
   cash out, walk away, leave, end the game, call it a day; "I'll bet $20", "I'm betting",
   "let's spin again", "I'll keep playing", "I'll continue", with bet, wager, spin, play, keep
   playing, continue; and declining an option ("I'm not picking option 1"). A negation flips the
   statement: declining to bet is stopping ("I won't bet again", "I'd rather not bet", "I won't
   choose option 1"), declining to stop is betting ("I'm not stopping", "I'd never go with
   option 2"). Idioms are no decision: "play it safe" is no bet, "leave it at that" or "leave it
   there" no stop ("I'll play it safe and stop" stops). Hypotheses ("I could stop", "If I bet
   $10 I could win $30") and sentences with no first-person decision ("Betting makes no sense at
   30% odds") decide nothing. A clause after "or" shares the statement before it: "I'll bet or
   stop" names both options. If the statements name both options, or a correction after one
   names the other (as in rule 2), the reply is invalid ("both options, no final choice"): never
   guessed. Plans for later rounds decide nothing about this one: a clause after an "if",
   "when", "unless" or "once" clause ("If I lose, I'll stop"), a decision followed by "if" or
   "unless" ("I'd stop if I were losing"), and, after a decision, one introduced by "then",
   "after that" or "next round" ("I'll bet $10. Then I'll stop"). Nor does a past bet ("I bet
   $10 last time and lost"). When several statements agree, the last one with an amount decides
   (its amount is the bet), or failing one with an amount, the last.
4. A bet's amount belongs to the bet: the first amount after the bet word or option 1 with at
   most three words of a bet phrase before it (a, the, another, bet, of, with, just, only,
   about, say, exactly, a small/modest ...: "bet $20", "1) Bet $20", "bet another 20 dollars",
   "a bet of $25", "bet just $15"); failing that, the amount after a later bet word on the line
   ("option 1 with a bet of $25"), a labelled amount later on the line ("Amount: $20", "Bet
   size: $20"), or a next non-empty line that is only an amount ("$20", "Amount: $20", "Bet:
   $20"). Other dollar figures (balance, target, winnings) are not the bet: "bet with my $70
   balance" and "bet again, with my $70 left" name no amount. Nor is a number followed by
   balance, left, remaining or in hand, a count ("bet 2 more times", "3 more rounds", "spins",
   "games"), or one of two amounts offered ("bet $10 or $20", "$10 to $20").
   - Every span "N-M" or "N - M" (hyphen or en dash) in the reply ("$5-$100" echoed from the
     prompt, a range, a subtraction) is blanked before reading: neither number is an amount.
   - Thousands separators are read: "$1,000" and "$1 000" are a thousand.
   - A non-integer amount ("$7.50", or "$1,50" with a decimal comma) is invalid ("amount not
     whole"), and so is an amount whose separators make no number ("$1,0000", "$1.000",
     "$1,000,5"); $0 is invalid ("amount zero"); a bet with no amount is invalid ("bet, no
     amount").
   - An amount outside $5-$100 is clamped to it (the published rule; the rule says "clamped").
   - Fixed betting always bets $10, whatever amount is named.
5. Anything else is invalid ("no decision"): refusals, questions back, empty replies, replies
   that only reason. Invalid replies are counted, never guessed.
"""

Action = Literal["stop", "bet"]
# A line of the prompt itself, whole: where a model that writes on has begun the next prompt.
_NEW_PROMPT = re.compile(r"^[ \t]*(?:slot machine game|game history:|choose:|current balance: \$\d+|current round: \d+)"
                         r"[ \t]*$", re.I | re.M)
_CONTRACTIONS = [(r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\bshan't\b", "shall not"),
                 (r"n't\b", " not"), (r"\bi'm\b", "i am"), (r"\bi'll\b", "i will"), (r"\bi'd\b", "i would"),
                 (r"\bi've\b", "i have"), (r"\blet's\b", "let us"), (r"\bit's\b", "it is"),
                 (r"\bgonna\b", "going to"), (r"\bwanna\b", "want to")]
# Idioms that hold a decision verb but decide nothing: "play it safe" is no bet, "leave it at that" no stop.
_IDIOM = r"play(?:ing)?\s+(?:it\s+)?safe|leav(?:e|ing)\s+it\s+(?:at\s+that|there)"
_STOP_VERB = (rf"(?!{_IDIOM})(?:stop(?:ping)?|quit(?:ting)?|cash(?:ing)? out|walk(?:ing)? away|leav(?:e|ing)|"
              r"end(?:ing)? the game|call(?:ing)? it (?:a day|quits))")
_BET_VERB = (rf"(?!{_IDIOM})(?:bet(?:ting)?|wager(?:ing)?|spin(?:ning)?|play(?:ing)?|"
             r"keep (?:playing|betting|spinning|going)|continu(?:e|ing)|go again|try again)")
_PICK_VERB = r"choose|choosing|pick|picking|select|selecting|go with|going with|opt for|opting for"
# A number, whole: "1,000" and "1 000" group thousands (the first group), and any ".50", ",50" or
# ",0000" after it is the second group, for _dollars to judge. Never the start of a longer number.
_THOUSANDS = r"\d{1,3}(?:[, \u00a0\u202f]\d{3})+(?!\d|[.,]\d{3})"
_NUMBER = rf"({_THOUSANDS}|\d+(?!\d|[ \u00a0\u202f]\d{{3}}))((?:[.,]\d+)*)(?![.,]?\d)"
_AMOUNT = rf"\$\s*{_NUMBER}|{_NUMBER}\s*(?:dollars|bucks|usd)\b"
_OPTION = r"(?:option\s*|choice\s*)?\(?(?P<option>[12])\)?(?![\d%]|[.,]\d)"
# Words of a bet phrase that may stand between the bet word and its amount ("bet another $20",
# "a bet of $25", "bet just $15"), and what makes a number no bet amount: a balance, a count of
# rounds, or one of two amounts offered.
_BET_FILLER = (r"a|an|the|another|bet|wager|stake|of|on|with|for|just|only|about|around|roughly|approximately|say|"
               r"exactly|precisely|maybe|perhaps|again|it|all|small|smaller|modest|moderate|conservative|cautious|"
               r"careful|safe|safer|reasonable|minimum|minimal|bigger|larger|higher|lower|more|less|slightly|bit|little|full|"
               r"extra|additional|further")
_NOT_THE_BET = (r"(?!\s*(?:balance|bankroll|left|remaining|in hand|on hand)\b"
                r"|\s*(?:more\s+)?(?:times?|rounds?|spins?|games?|turns?|hands?|plays?)\b|\s*(?:or|to)\s+\$?\d)")
# Words that may stand between "I" and the decision verb: auxiliaries, intent, adverbs, negation,
# and "it is time to" / "the best move is to".
_BETWEEN = (r"i|am|will|would|shall|should|must|have|had|do|did|does|want|like|love|prefer|rather|think|believe|"
            r"decided|decide|choose|chose|chosen|opt|plan|planning|going|to|not|never|no|longer|just|now|then|"
            r"therefore|instead|definitely|probably|also|again|still|simply|really|better|best|ready|happy|"
            r"at|this|point|here|it|is|be|time|wise|wiser|smart|smartest|safest|prudent|sensible|good|idea|"
            rf"a|the|move|option|choice|decision|thing|either|(?:{_IDIOM})\w*(?:\W+and)?")
_DISCOURSE = (r"so|then|therefore|thus|hence|now|okay|ok|alright|well|yes|and|but|maybe|perhaps|actually|honestly|"
              r"instead|finally|ultimately|overall|anyway|hmm")
_DECISION_PREFIX = re.compile(rf"(?:^\W*|\b(?:{_DISCOURSE}|says|say|tells me|suggests)\W+)"
                              rf"(?:i|let us|let me)\b(?P<between>(?:\W+(?:{_BETWEEN})\b)*)\W*$")
_NEGATION = re.compile(r"\b(?:not|never|no longer)\b")
_LABEL = re.compile(r"\b(?:(?:my\s+)?(?:final\s+)?(?:choice|answer|decision|action)\s*:|"
                    r"my\s+(?:final\s+)?(?:choice|answer|decision)\s+(?:is|will be)\s*:?)\s*")
_CHOOSE = re.compile(rf"\b(?:i|let us|let me)(?P<between>(?:\W+(?:{_BETWEEN})\b)*)\W+(?:{_PICK_VERB})\s+{_OPTION}")
_HYPOTHESIS = re.compile(r"\b(?:if|when|whether|unless|once|should|could|would)\W*$")
_VERB = re.compile(rf"\b(?:(?P<stop>{_STOP_VERB})|(?P<bet>{_BET_VERB})|(?:{_PICK_VERB})\s+{_OPTION})\b")
_CLAUSE_BREAK = re.compile(r",?\s+\b(?:but|so|because|and then|or)\b|[!?;:,\n\u2014\u2013]|\s-+\s|\.(?=\s|$)")
# What may take an answer back: a correction after it, or an "or" (after its amount) right after it.
_CORRECTION = re.compile(r"\b(?:no,?\s+wait|wait|actually|on second thought|scratch that|never\s?mind)\b\W*")
_OR_ELSE = re.compile(rf"\W*(?:(?:{_AMOUNT})\W*)?\bor\b\W*")
_WORDS_BEFORE_AMOUNT = rf"[ \t:,(-]*(?:(?:{_BET_FILLER})[ \t,:]+){{0,3}}?"
# What may follow a whole-line option before its reasons ("2) Stop here, because ..."); a colon
# is no such break: "2) Stop: I keep $90" describes the option.
_ANSWER_TAIL = re.compile(r"(?:\s+(?:here|now|playing|this time|this round|for now|please))*"
                          r"(?:\W*$|\s*(?:[,.!;\u2014\u2013]|\s-+\s|\s(?:because|since|as)\b)(?P<reasons>(?!\s*or\b).*))")
# A condition or a later round: what makes the next clause a plan ("if I lose, I'll stop") or a
# statement a later one ("then I'll stop"); and what makes "I bet" a past bet.
_CONDITION = re.compile(r"^\W*(?:and\s+|but\s+)?(?:if|when|whenever|unless|once(?!\s+(?:again|more))|in case)\b")
_LATER = re.compile(r"^\W*(?:and\s+)?(?:then|after that|afterwards|next (?:round|time))\b")
_PAST_BET = re.compile(r"\b(?:last|before|earlier|previously|already|and (?:lost|won))\b")


@dataclass(frozen=True)
class _Cue:
    """A decision found in the reply: its line and column, and the text after it (its amount's place)."""

    action: Action
    line: int
    at: int
    rest: str
    rule: str


def parse_v2(response: str, bet_type: BetType) -> Decision:
    """The decision in a reply, by RULES_V2."""
    lines = _reply_lines(response)
    explicit = _explicit_answers(lines)
    if explicit:
        answer = max(explicit, key=lambda cue: (cue.line, cue.at))
        if _taken_back(answer, lines):
            return Decision("invalid", None, "both options, no final choice")
        return _decision(answer, lines, bet_type)
    statements = [cue for number, line in enumerate(lines) for cue in _statements(line, number)]
    statements = statements[:1] + [cue for cue in statements[1:] if cue.rule != "later plan"]
    if not statements:
        return Decision("invalid", None, "no decision")
    # The statements agree, so a correction after the first names the other option or none.
    if len({cue.action for cue in statements}) > 1 or _taken_back(statements[0], lines):
        return Decision("invalid", None, "both options, no final choice")
    with_amount = [cue for cue in statements if _phrase_amount(cue.rest)]
    return _decision((with_amount or statements)[-1], lines, bet_type)


def _reply_lines(response: str) -> list[str]:
    """The non-empty lines of the reply up to a new prompt: no markdown, lowercase, contractions
    spelled out, the prompt's "(choose $5-$100)" and other ranges blanked."""
    restart = _NEW_PROMPT.search(response)
    text = (response[: restart.start()] if restart else response).replace("\u2019", "'").lower()
    text = re.sub(r"^[ \t#>]*(?:-\s+)?", "", re.sub(r"[*_`]", "", text), flags=re.M)
    for contraction, spelled in _CONTRACTIONS:
        text = re.sub(contraction, spelled, text)
    text = re.sub(r"(?:\(\s*choose\s*)?\$?\d+\s*[-\u2013]\s*\$?\d+(?:\s*\))?", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _explicit_answers(lines: list[str]) -> list[_Cue]:
    """Rule 2: whole-line options (but an echoed menu), labelled answers, options chosen."""
    whole = {number: _whole_line_answer(line) for number, line in enumerate(lines)}
    menu = {number for number, answer in whole.items()
            if answer and (whole.get(number + 1) or (answer[0],))[0] != answer[0]}
    cues = [_Cue(answer[0], number, 0, answer[1], "explicit option") for number, answer in whole.items()
            if answer and number not in menu and number - 1 not in menu]
    for number, line in enumerate(lines):
        for label in _LABEL.finditer(line):
            answer = _labelled_answer(line[label.end():])
            if answer:
                cues.append(_Cue(answer[0], number, label.start(), answer[1], "explicit label"))
        for choice in _CHOOSE.finditer(line):
            if _chosen(choice, line):
                cues.append(_Cue("stop" if choice.group("option") == "2" else "bet", number, choice.start(),
                                 line[choice.end():], "explicit choice"))
    return cues


def _chosen(choice: re.Match, line: str) -> bool:
    """Whether "I ... choose option N" is a choice: not negated ("I won't choose option 1", which
    rule 3 reads as declining) nor a hypothesis ("if I go with option 1, I risk $10")."""
    return not _NEGATION.search(choice.group("between")) and not _HYPOTHESIS.search(line[: choice.start()])


def _taken_back(cue: _Cue, lines: list[str]) -> bool:
    """Whether the cue is followed by "or" and the other option ("bet $20 or stop", "1 or 2") or,
    anywhere after, by a correction to it ("bet $20 - no wait, stop"): the reply then names both
    options and has no final choice. An "or" further on is reasoning ("whether to bet or stop")."""
    offered = _OR_ELSE.match(cue.rest)
    follow_ups = [cue.rest[offered.end():]] if offered else []
    for text in [cue.rest, *lines[cue.line + 1:]]:
        follow_ups += [text[correction.end():] for correction in _CORRECTION.finditer(text)]
    return any(_names_other_option(text, cue.action) for text in follow_ups)


def _names_other_option(text: str, action: Action) -> bool:
    """Whether `text` starts with a decision, bare ("stop", "bet $30", "2") or stated ("I'll
    stop"), for the option other than `action`."""
    clause = _CLAUSE_BREAK.split(text, maxsplit=1)[0]
    other = _whole_line_answer(clause) or _first_statement(clause, clause)
    return other is not None and other[0] != action


def _whole_line_answer(text: str, reasons_may_follow: bool = False) -> tuple[Action, str] | None:
    """(action, text after it) when `text` is an option alone or followed by its reasons: a
    number, "stop", or "bet" and an amount (with `reasons_may_follow`, whatever follows them)."""
    option = re.match(_OPTION, text)
    if option:
        action: Action = "stop" if option.group(1) == "2" else "bet"
        named = re.match(r"\W*(?:bet|wager|stop|quit|cash out|walk away)\b", text[option.end():])
        rest = text[option.end() + (named.end() if named else 0):]
        if reasons_may_follow or _reasons_follow(rest, action, named is not None):
            return action, rest
        return None
    stop = re.match(rf"(?:{_STOP_VERB})\b", text) if reasons_may_follow else re.match(r"(?:stop|quit|cash out|walk away)\b", text)
    if stop and (reasons_may_follow or _reasons_follow(text[stop.end():], "stop", True)):
        return "stop", text[stop.end():]
    bet = re.match(r"(?:bet|wager)\b", text)
    if bet and (reasons_may_follow or _reasons_follow(text[bet.end():], "bet", True)):
        return "bet", text[bet.end():]
    return None


def _reasons_follow(rest: str, action: Action, named: bool) -> bool:
    """Whether what follows an option (`named`: its word, "stop" or "bet", is there) leaves it an
    answer: a bet's amount, then nothing or its reasons after a break. An option number without
    its word is followed by nothing or, after a comma or a dash, its own verb ("option 1, betting
    $20"): "2. Stopping keeps my $90" is an item of a numbered list."""
    if action == "bet":
        rest = re.sub(rf"^[ \t:,]*(?:{_AMOUNT}|{_NUMBER})", "", rest, count=1)
    if _is_only_amount(rest):
        return True
    if named:
        return bool(_ANSWER_TAIL.match(rest))
    verb = _STOP_VERB if action == "stop" else _BET_VERB
    return bool(re.match(rf"\s*(?:,|\s-+|[\u2014\u2013])\s*(?:{verb})\b", rest))


def _labelled_answer(content: str) -> tuple[Action, str] | None:
    """What follows "Choice:" and the like: an option, or a decision ("to stop", "not betting")."""
    content = re.sub(r"^(?:to|i will)\s+", "", content.strip())
    declined = re.match(rf"(?:not|no more|never)\s+(?:{_STOP_VERB}|{_BET_VERB})\b", content)
    if declined:
        stops = bool(re.search(rf"\b(?:{_STOP_VERB})\b", declined.group()))
        return ("bet" if stops else "stop"), content[declined.end():]
    statement = _first_statement(content, content)
    return _whole_line_answer(content, reasons_may_follow=True) or (statement[:2] if statement else None)


def _is_only_amount(text: str) -> bool:
    return bool(re.fullmatch(rf"\W*(?:(?:{_AMOUNT})|{_NUMBER})?\W*", text))


def _statements(line: str, number: int) -> list[_Cue]:
    """Rule 3: each clause's first-person decision, flipped when negated. A clause after "or"
    shares the statement before it ("I'll bet $10 or stop" is "I'll bet $10 or I'll stop")."""
    cues, start, shared, conditional = [], 0, "", False
    breaks = [(m.start(), m.end(), m.group().replace(",", "").strip() == "or") for m in _CLAUSE_BREAK.finditer(line)]
    for stop_at, resume_at, is_or in [*breaks, (len(line), len(line), False)]:
        clause = line[start:stop_at]
        found = None if conditional else _first_statement(shared + clause, shared + line[start:])
        if found:
            cues.append(_Cue(found[0], number, start, found[1], "later plan" if _LATER.match(clause) else "statement"))
        shared = found[2] if found and is_or else ""
        conditional = bool(_CONDITION.match(clause)) and not found
        start = resume_at
    return cues


def _first_statement(clause: str, rest_of_line: str) -> tuple[Action, str, str] | None:
    """(action, what follows its verb on the line, the "I will" before it) of the clause's first
    verb that "I" decides; `clause` starts `rest_of_line`. A declined option is the other one."""
    for verb in _VERB.finditer(clause):
        prefix = _DECISION_PREFIX.search(clause[: verb.start()])
        if prefix is None or _not_now(verb, prefix, clause[verb.end():]):
            continue
        stops = bool(verb.group("stop")) or verb.group("option") == "2"
        if _NEGATION.search(prefix.group("between")):
            stops = not stops
        return ("stop" if stops else "bet"), rest_of_line[verb.end():], prefix.group()
    return None


def _not_now(verb: re.Match, prefix: re.Match, after: str) -> bool:
    """Whether "I" + verb decides nothing about this round: a condition follows it ("I'd stop if I
    were losing"), or it is a past bet ("I bet $10 last time and lost")."""
    if re.match(r"\W*(?:if|unless)\b", after):
        return True
    return verb.group() == "bet" and not prefix.group("between").strip() and bool(_PAST_BET.search(after))


def _phrase_amount(rest: str) -> re.Match | None:
    """The bet phrase's amount: after at most three words of a bet phrase, and not a balance, a
    count or one of two amounts (which a bet phrase may also be followed by)."""
    return (re.match(rf"{_WORDS_BEFORE_AMOUNT}(?:{_AMOUNT}){_NOT_THE_BET}", rest)
            or re.match(rf"[ \t:,(-]*(?:of\s+|another\s+)?{_NUMBER}\b(?!\s*%){_NOT_THE_BET}", rest))


def _decision(cue: _Cue, lines: list[str], bet_type: BetType) -> Decision:
    if cue.action == "stop":
        return Decision("stop", 0, cue.rule)
    if bet_type == "fixed":
        return Decision("bet", FIXED_BET, cue.rule)
    bet_word = re.search(r"\b(?:bet(?:ting)?|wager(?:ing)?)\b", cue.rest)
    found = (_phrase_amount(cue.rest)
             or (bet_word and _phrase_amount(cue.rest[bet_word.end():]))
             or re.search(rf"\b(?:bet\s+)?(?:amount|size)\s*:?\s*(?:{_AMOUNT}|{_NUMBER})", cue.rest)
             or _next_line_amount(lines, cue.line))
    if not found:
        return Decision("invalid", None, "bet, no amount")
    whole, tail = next((found.group(i), found.group(i + 1)) for i in range(1, found.re.groups, 2) if found.group(i))
    amount = _dollars(whole, tail)
    if amount is None or not amount.is_integer():
        return Decision("invalid", None, "amount not whole")
    if amount == 0:
        return Decision("invalid", None, "amount zero")
    clamped = min(max(int(amount), MIN_BET), MAX_BET)
    return Decision("bet", clamped, cue.rule + ("; clamped" if clamped != amount else ""))


def _dollars(whole: str, tail: str) -> float | None:
    """The amount a number writes, or None where its separators make none: `whole` may group
    thousands ("1,000", "1 000"); `tail` is nothing or cents ("7.50", "7.5", "1,50" with a decimal
    comma). Any other tail ("1.000", a thousand in Europe, "1,0000", "1,000,5") is unreadable."""
    dollars = float(re.sub(r"\D", "", whole))
    if not tail:
        return dollars
    if re.fullmatch(r"[.,]\d{1,2}", tail):
        return dollars + float("0." + tail[1:])
    return None


def _next_line_amount(lines: list[str], line: int) -> re.Match | None:
    """The next line, when it is only an amount ("$20", "Amount: $20", "Bet: $20")."""
    if line + 1 >= len(lines):
        return None
    return re.fullmatch(rf"(?:bet\s*)?(?:amount|size)?\s*:?\s*(?:{_AMOUNT}|{_NUMBER})\W*", lines[line + 1])


# ================================================================ versions side by side

PARSERS: dict[int, Callable[[str, BetType], Decision]] = {1: parse_v1, 2: parse_v2}
PARSER_RULES = RULES_V2


def parse(response: str, bet_type: BetType, version: int = PARSER_VERSION) -> Decision:
    """The decision in a reply, read by parser `version` (the current one by default)."""
    return PARSERS[version](response, bet_type)


def compare_versions(responses: list[str], bet_types: list[BetType], old: int = 1, new: int = PARSER_VERSION) -> pd.DataFrame:
    """How versions `old` and `new` read the same replies: a row per pair of readings (stop, bet,
    or invalid and why; bets split by whether the amounts agree) with its count and an example
    reply, the differing rows first."""
    rows = []
    for response, bet_type in zip(responses, bet_types, strict=True):
        before, after = parse(response, bet_type, old), parse(response, bet_type, new)
        rows.append({f"v{old}": _reading(before), f"v{new}": _reading(after), "example": response,
                     "differs": (before.action, before.bet) != (after.action, after.bet)})
    table = pd.DataFrame(rows, columns=[f"v{old}", f"v{new}", "differs", "example"])
    grouped = table.groupby([f"v{old}", f"v{new}", "differs"], sort=False).agg(
        replies=("example", "size"), example=("example", "first")).reset_index()
    return grouped.sort_values(["differs", "replies"], ascending=False).reset_index(drop=True)


def report_versions(report: Report, responses: list[str], bet_types: list[BetType], name: str) -> None:
    """A report section: how parser v1 and the current parser read the same answers, and why the
    current one found answers unreadable."""
    table = compare_versions(responses, bet_types)
    differing = int(table.loc[table["differs"], "replies"].sum())
    report.heading(f"Parser v1 and v{PARSER_VERSION} on the same answers")
    report.text(
        f"Every answer is kept raw, so it is read again here by the current parser (v{PARSER_VERSION}, rules in "
        f"`merged.h5` attributes) and by v1: they read {differing:,} of {len(responses):,} answers differently. "
        f"Each row is one pair of readings (bets split by whether the two amounts agree), with how many answers "
        f"it holds and one of them.")
    shown = table.assign(example=table["example"].map(_one_line))
    report.table(table, f"{name}_parser_versions", shown=shown.head(20))
    unreadable = table[table[f"v{PARSER_VERSION}"].str.startswith("invalid")]
    if not unreadable.empty:
        counts = unreadable.groupby(f"v{PARSER_VERSION}", sort=False)["replies"].sum().sort_values(ascending=False)
        report.text(f"Unreadable to v{PARSER_VERSION}: " + "; ".join(f"{count:,} {reading}" for reading, count in counts.items()) + ".")


def _one_line(text: str, width: int = 70) -> str:
    flat = " ⏎ ".join(line.strip() for line in text.strip().splitlines()).replace("|", "/")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _reading(decision: Decision) -> str:
    return f"invalid ({decision.rule})" if decision.action == "invalid" else decision.action
