"""The built-in default task: customer-support messages in 8 intents, generated from a seed.

Made here so the main job needs neither network nor a downloaded dataset. Each message joins an
opening, a body built from one of many templates of its intent with slots filled in, and a closing,
so wording varies widely while the intent stays clear to a reader.
"""
from __future__ import annotations

import random

LABELS = ["billing", "delivery", "refund", "login", "cancel", "technical", "address", "praise"]

SLOTS = {
    "item": ["headphones", "blender", "phone case", "desk lamp", "backpack", "coffee maker", "keyboard",
             "yoga mat", "winter jacket", "router", "kettle", "monitor", "sneakers", "printer", "tent"],
    "days": ["two days", "a week", "ten days", "three weeks", "five days", "a month"],
    "amount": ["$12.99", "$40", "$250", "$8.50", "$99", "€30", "£15", "$1,200"],
    "device": ["iPhone", "Android phone", "laptop", "tablet", "Windows PC", "Mac", "smart TV"],
    "city": ["Denver", "Leeds", "Toronto", "Austin", "Dublin", "Perth", "Lyon", "Osaka"],
    "month": ["January", "March", "May", "July", "September", "November"],
}

TEMPLATES = {
    "billing": [
        "I was charged {amount} twice on my card for the same order",
        "why does my statement show a charge of {amount} I don't recognise",
        "my invoice for {month} has the wrong total on it",
        "you billed me {amount} but the price on the site was lower",
        "can you explain the extra fee of {amount} on my last bill",
        "the payment for my {item} went through twice",
        "I need a copy of the invoice for my {item} for my taxes",
        "my subscription renewed at {amount} instead of the advertised price",
        "there's a charge from {month} I never authorised",
        "how do I update the credit card you bill each month",
    ],
    "delivery": [
        "my {item} still hasn't arrived after {days}",
        "where is my package? tracking hasn't moved in {days}",
        "the courier says delivered but there's no {item} at my door",
        "when will my order ship to {city}",
        "can you tell me the delivery date for my {item}",
        "the tracking number you sent me doesn't work",
        "my parcel has been stuck at the depot in {city} for {days}",
        "is express shipping available for the {item} I ordered",
        "the delivery driver never showed up yesterday",
        "how long does shipping to {city} usually take",
    ],
    "refund": [
        "I returned the {item} {days} ago and still have no refund",
        "I want my money back for the broken {item}",
        "how long do refunds take to reach my card",
        "please refund the {amount} for the order you cancelled",
        "the {item} arrived damaged, I'd like a full refund",
        "you promised a refund of {amount} but I only got part of it",
        "can I get a refund instead of store credit for the {item}",
        "my refund was approved but the {amount} never showed up",
        "the {item} is not what I ordered, send my money back please",
        "what is your refund policy for opened items like a {item}",
    ],
    "login": [
        "I can't log in to my account on my {device}",
        "the password reset email never arrives",
        "it keeps saying my password is wrong even after I reset it",
        "I'm locked out after too many sign-in attempts",
        "the two-factor code isn't being sent to my phone",
        "I forgot the email address I signed up with",
        "the login page just spins forever on my {device}",
        "how do I sign in with my new phone number",
        "my account got logged out and now it won't accept my details",
        "can't access my profile, it says session expired every time",
    ],
    "cancel": [
        "please cancel my subscription before the next renewal in {month}",
        "I want to cancel the order for the {item}",
        "how do I close my account for good",
        "stop my membership, I don't use it anymore",
        "cancel the {item} I ordered by mistake this morning",
        "I'd like to end my plan at the end of {month}",
        "can I still cancel an order that hasn't shipped yet",
        "don't renew my plan next month, I'm done with it",
        "please delete my account and all my data",
        "I changed my mind about the {item}, cancel it please",
    ],
    "technical": [
        "the app crashes every time I open it on my {device}",
        "the {item} I bought won't turn on at all",
        "your website shows an error when I try to check out",
        "the {item} makes a loud buzzing noise after {days}",
        "the app is really slow and freezes on my {device}",
        "my {item} keeps disconnecting from wifi",
        "the firmware update bricked my {item}",
        "I get a blank screen when I open the app on my {device}",
        "the setup instructions for the {item} don't match what I see",
        "notifications stopped working on my {device} after the update",
    ],
    "address": [
        "I moved to {city}, please update my shipping address",
        "can I change the delivery address on my {item} order",
        "my address has a typo, the street name is wrong",
        "please send my order to my office in {city} instead",
        "how do I add a second address to my account",
        "update my billing address to my new place in {city}",
        "I entered the wrong postcode for my order",
        "can you redirect the {item} to my neighbour's address",
        "remove my old address in {city} from my profile",
        "the apartment number is missing from my address",
    ],
    "praise": [
        "just wanted to say the {item} is fantastic, thank you",
        "your support agent was so helpful yesterday",
        "the {item} arrived early and works perfectly",
        "great service, I'll definitely order again",
        "love the {item}, best purchase I've made this year",
        "thanks for sorting out my problem so quickly",
        "the packaging was lovely and the {item} is great quality",
        "really impressed with how fast you shipped to {city}",
        "five stars, the team went above and beyond",
        "I keep recommending your shop to my friends in {city}",
    ],
}

OPENINGS = ["", "", "", "Hi, ", "Hello, ", "Hey, ", "Good morning, ", "Hi there, ", "Excuse me, ", "Dear team, "]
CLOSINGS = ["", "", "", ".", "!", "?", ". Thanks", ". Thank you!", ", please help", ". Cheers", " asap", "..."]


def _style(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.1:
        return text.lower()
    if r < 0.15:
        return text.upper()
    return text[0].upper() + text[1:]


def make_examples(n_per_label: int = 160, seed: int = 0) -> list[dict]:
    """`n_per_label` examples for each of the 8 labels, in a seeded shuffled order."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for label in LABELS:
        made, tries = 0, 0
        while made < n_per_label and tries < n_per_label * 50:
            tries += 1
            body = rng.choice(TEMPLATES[label]).format(**{k: rng.choice(v) for k, v in SLOTS.items()})
            text = _style(rng.choice(OPENINGS) + body + rng.choice(CLOSINGS), rng)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
            made += 1
    rng.shuffle(rows)
    return rows


INSTRUCTION = "Classify the customer message into one intent."
